"""Compare training runs: a markdown table and PNG plots, read from run folders only.

A run folder is what ``ogmge-train --out RUN`` writes (ARCHITECTURE.md "Run folder"):
``config.json``, ``metrics.jsonl``, ``steps.jsonl``, ``summary.json`` and, after
``ogmge-train probe``, ``probe_<modality>.json``. A sweep folder holds ``seed-<k>`` run folders.

Runs whose configurations differ only in ``seed`` (and the output path) form one group; the
table shows each group's mean ± sample standard deviation (ddof = 1) over its seeds, and the
plots draw the per-epoch / per-step mean over seeds. Nothing here trains or loads a model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avprep import shardformat as sf

from . import runfolder
from .config import NOT_EXPERIMENT_FIELDS
from .names import SELECTION_LABELS
from .stats import mean_std

__all__ = ["RunRecord", "Group", "Report", "COLUMNS", "plot_shapley", "read_run", "expand_runs", "group_runs",
           "mean_std", "format_cell", "run_values", "group_table", "markdown_table", "plot_accuracy",
           "plot_rho", "plot_loss", "write_report", "dominant_modality", "test_clips", "clips_sentence",
           "per_seed", "plot_seed_bars", "plot_contrasts", "plot_mechanism", "column_titles", "AT", "selection"]


# (column title, key in run_values) — the table's columns after the "run" column.
COLUMNS = (
    ("seeds", "n"),
    ("fused acc", "acc"),
    ("fused mAP", "map"),
    ("audio acc", "acc_a"),
    ("visual acc", "acc_v"),
    ("audio probe acc", "probe_a"),
    ("visual probe acc", "probe_v"),
    ("selected epoch", "epoch"),
    # the imbalance measure (ogmge_train.imbalance): each modality's Shapley value of the fused
    # test accuracy at the selected epoch, BalanceBenchmark's definition, in accuracy points
    ("audio Shapley", "shapley_a"),
    ("visual Shapley", "shapley_v"),
)



@dataclass
class RunRecord:
    """Everything a report needs from one run folder."""

    path: Path
    config: dict
    metrics: list[dict]
    steps: list[dict]
    summary: dict | None
    probes: dict[str, dict] = field(default_factory=dict)   # "audio"/"visual" -> probe json

    @property
    def name(self) -> str:
        """``sweep/seed-1`` -> ``sweep``; a plain run -> its folder name."""
        if runfolder.SEED_DIR.match(self.path.name):
            return self.path.parent.name
        return self.path.name


@dataclass
class Group:
    """Runs of one configuration (different seeds)."""

    label: str
    runs: list[RunRecord]


@dataclass
class Report:
    markdown: Path
    plots: dict[str, Path]          # "accuracy", "rho", "loss" -> PNG
    table: list[dict]               # one dict per group: label, n and (mean, std) per column key
    groups: list[Group]


# ----------------------------------------------------------------------------- reading

def read_run(path) -> RunRecord:
    """Read one run folder; ``summary.json`` may be absent (run still going)."""
    path = Path(path)
    config = runfolder.read_config(path)
    probes = {m: p for m in ("audio", "visual") if (p := runfolder.read_probe(path, m)) is not None}
    return RunRecord(path, config, runfolder.read_metrics(path), runfolder.read_steps(path),
                     runfolder.read_summary(path), probes)


expand_runs = runfolder.expand_runs


def _experiment_key(config: dict) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in NOT_EXPERIMENT_FIELDS},
                      sort_keys=True, default=str)


def group_runs(runs: list[RunRecord]) -> list[Group]:
    """Group runs by configuration minus seed/output, in first-seen order."""
    groups: dict[str, Group] = {}
    for run in runs:
        key = _experiment_key(run.config)
        if key in groups:
            groups[key].runs.append(run)
        else:
            groups[key] = Group(run.name, [run])
    # two different configurations may share a folder name: keep labels unique
    seen: dict[str, int] = {}
    for g in groups.values():
        seen[g.label] = seen.get(g.label, 0) + 1
        if seen[g.label] > 1:
            g.label = f"{g.label} ({seen[g.label]})"
    return list(groups.values())


# ----------------------------------------------------------------------------- numbers

def selection(run: RunRecord) -> str:
    """How the run picks its epoch: "val", "test" (the reference code's protocol) or "last"."""
    if run.summary and run.summary.get("selection"):
        return {"val_acc": "val", "test_acc": "test"}.get(run.summary["selection"], "last")
    return run.config.get("select_on", "val")


def _selected(run: RunRecord) -> tuple[int | None, dict, dict]:
    """(selected epoch, val metrics, test metrics): summary.json, else the best epoch so far on
    the run's selection split."""
    if run.summary:
        return run.summary.get("selected_epoch"), run.summary.get("val") or {}, run.summary.get("test") or {}
    on = selection(run)
    rows = [m for m in run.metrics if (m.get(on) or {}).get("acc") is not None]
    if not rows:
        return None, {}, {}
    best = max(rows, key=lambda m: m[on]["acc"])     # first maximum, as selection does
    return best.get("epoch"), best.get("val") or {}, best.get("test") or {}


def _last(run: RunRecord) -> tuple[int | None, dict, dict]:
    """(epoch, val metrics, test metrics) of the run's last epoch, whether or not it was selected
    (None, {}, {} when that epoch was not evaluated on test)."""
    rows = [m for m in run.metrics if "epoch" in m]
    if not rows or not rows[-1].get("test"):
        return None, {}, {}
    return rows[-1]["epoch"], rows[-1].get("val") or {}, rows[-1]["test"]


AT = ("selected", "last")


def _probe_acc(run: RunRecord, modality: str, epoch: int | None = None):
    """The probe's test accuracy; with ``epoch``, only a probe of that epoch's last.pt counts
    (a probe of best.pt would mix in the selected epoch)."""
    probe = run.probes.get(modality)
    if probe is None:
        return None
    if epoch is not None and (probe.get("which") != "last" or probe.get("checkpoint_epoch") != epoch):
        return None
    return (probe.get("test") or {}).get("acc")


def run_values(run: RunRecord, at: str = "selected") -> dict:
    """The table's numbers for one run (None where the run has no such output): test metrics at
    the epoch selected on val (``at="selected"``, probes of any checkpoint) or at the run's last
    epoch (``at="last"``, probes of last.pt at that epoch only)."""
    if at not in AT:
        raise ValueError(f"at must be one of {', '.join(AT)}, not {at!r}")
    epoch, _val, test = _selected(run) if at == "selected" else _last(run)
    probe_epoch = epoch if at == "last" else None
    if at == "last" and epoch is None:
        probe_epoch = -1            # no last epoch on test: no probe counts either
    return {"acc": test.get("acc"), "map": test.get("map"), "acc_a": test.get("acc_a"),
            "acc_v": test.get("acc_v"), "probe_a": _probe_acc(run, "audio", probe_epoch),
            "probe_v": _probe_acc(run, "visual", probe_epoch), "epoch": epoch,
            "shapley_a": test.get("shapley_a"), "shapley_v": test.get("shapley_v")}


def per_seed(runs: list[RunRecord], key: str, at: str = "selected") -> dict[int, float]:
    """``run_values(run, at)[key]`` by the run's seed (runs without the value left out)."""
    out = {}
    for r in runs:
        v = run_values(r, at)[key]
        if v is not None:
            out[int(r.config.get("seed", 0))] = float(v)
    return out


def group_table(groups: list[Group], at: str = "selected") -> list[dict]:
    """One row per group: ``label``, ``n`` and ``(mean, std)`` for each column key."""
    rows = []
    for g in groups:
        per_run = [run_values(r, at) for r in g.runs]
        kinds = {"last"} if at == "last" else {selection(r) for r in g.runs}
        row = {"label": g.label, "n": len(g.runs), "selection": kinds.pop() if len(kinds) == 1 else "mixed"}
        for _title, key in COLUMNS[1:]:
            row[key] = mean_std(v[key] for v in per_run)
        rows.append(row)
    return rows


def format_cell(key: str, ms, selection: str | None = None) -> str:
    """``(mean, std)`` of column ``key`` as table text: percent for metrics, "—" for none, no
    "±" when the std was not measured (one seed). A value selected on test (``selection`` "test")
    says so next to it."""
    text = _format(key, ms)
    if selection == "test" and text != "—":
        text += f" ({SELECTION_LABELS['test']})"
    return text


def _format(key: str, ms) -> str:
    mean, std = ms
    if mean is None:
        return "—"
    if key == "epoch":
        if std is None:
            return f"{mean:.0f}" if float(mean).is_integer() else f"{mean:.1f}"
        return f"{mean:.1f} ± {std:.1f}"
    # metrics are fractions in [0, 1]; the table shows percent
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def column_titles(at: str = "selected") -> list[str]:
    """The table's column titles after "run" (the epoch column names which epoch it is)."""
    return [("last epoch" if at == "last" and key == "epoch" else t) for t, key in COLUMNS]


def markdown_table(rows: list[dict], at: str = "selected") -> str:
    """A GitHub markdown table of ``group_table`` rows (accuracies in percent, mean ± std)."""
    head = ["run", *column_titles(at)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["label"].replace("|", "\\|"), str(row["n"])]
        cells += [format_cell(key, row[key], row.get("selection")) for _t, key in COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots

# Characters of text that fit in one inch of figure width (DejaVu Sans at 100 dpi, with the
# layout margins): the
# suptitle (12 pt) and the legend ("small", 10 pt) wrap or take fewer columns to stay inside.
_TITLE_CHARS_PER_INCH = 10.5
_LEGEND_CHARS_PER_INCH = 14.0


def _figure(ncols: int, title: str, width: float = 4.2, nrows: int = 1, height: float = 3.4):
    # Figure + Agg canvas, not pyplot: no global state, no display needed
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    fig.suptitle(textwrap.fill(title, max(20, int(width * ncols * _TITLE_CHARS_PER_INCH))))
    return fig, axes


def _epoch_curve(runs: list[RunRecord], get) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(epochs, mean, std) over runs of ``get(metrics_row)``, on the epochs every run has."""
    series = []
    for r in runs:
        pts = {m["epoch"]: get(m) for m in r.metrics if "epoch" in m}
        series.append({e: v for e, v in pts.items() if v is not None})
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not common:
        return None
    ys = np.array([[s[e] for e in common] for s in series], dtype=float)
    std = ys.std(axis=0, ddof=1) if len(series) > 1 else np.zeros(len(common))
    return np.array(common, dtype=float), ys.mean(axis=0), std


def _colour(i: int) -> str:
    # one colour per group, the same in every panel and plot
    return f"C{i % 10}"


def _draw(ax, curve, label, colour, scale=1.0):
    x, mean, std = curve
    ax.plot(x, scale * mean, label=label, color=colour, marker="." if len(x) < 30 else None)
    if np.any(std > 0):
        ax.fill_between(x, scale * (mean - std), scale * (mean + std), alpha=0.2, color=colour, linewidth=0)


def _epoch_axis(ax, ylabel: str, title: str | None = None, span: tuple[float, float] | None = None):
    """Epoch x axis with integer ticks only. ``span``: the x range to show (default: the data's,
    widened to at least one epoch, so a one-epoch run gets tick 0, not -0.045 ... 0.045)."""
    from matplotlib.ticker import MaxNLocator

    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    # min_n_ticks=1: with one integer in view MaxNLocator would otherwise fall back to fractions
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if span is None and ax.has_data():
        lo, hi = float(ax.dataLim.x0), float(ax.dataLim.x1)
        if hi - lo < 1:
            span = (lo - 0.5, hi + 0.5)
    if span is not None:
        ax.set_xlim(*span)
    ax.grid(alpha=0.3)


def _split_of(groups: list[Group], split: str) -> str:
    has = any((m.get(split) or {}).get("acc") is not None for g in groups for r in g.runs for m in r.metrics)
    return split if has else "val"


def plot_accuracy(groups: list[Group], path, split: str = "test") -> Path:
    """Paper Figure 1 style: fused, audio and visual accuracy per epoch, one line per group."""
    return _split_panels(groups, path, split, "accuracy per epoch", "accuracy (%)",
                         (("acc", "fused"), ("acc_a", "audio"), ("acc_v", "visual")))


def plot_shapley(groups: list[Group], path, split: str = "test") -> Path:
    """Each modality's Shapley value of the fused accuracy per epoch (ogmge_train.imbalance)."""
    return _split_panels(groups, path, split, "Shapley value of the fused accuracy per epoch",
                         "Shapley value (accuracy points)", (("shapley_a", "audio"), ("shapley_v", "visual")))


def _split_panels(groups: list[Group], path, split: str, what: str, ylabel: str, panels) -> Path:
    """One panel per ``(key, title)`` of ``panels``: ``split``'s per-epoch value of that key in
    percent, a line per group (mean ± std over its seeds)."""
    split = _split_of(groups, split)
    fig, axes = _figure(len(panels), f"{split} {what} (mean ± std over seeds)")
    for ax, (key, title) in zip(axes, panels):
        for i, g in enumerate(groups):
            curve = _epoch_curve(g.runs, lambda m, k=key: (m.get(split) or {}).get(k))
            if curve is not None:
                _draw(ax, curve, g.label, _colour(i), 100)
        _epoch_axis(ax, ylabel, title)
    _legend(axes)
    return _save(fig, path)


def _step_curve(runs: list[RunRecord], key: str, smooth: int):
    """(x in epochs, mean, std) of a per-step value over runs, moving-averaged over ``smooth`` steps."""
    series = []
    for r in runs:
        rows = [s for s in r.steps if s.get(key) is not None]
        if not rows:
            continue
        # x = fractional epoch, so runs with different steps per epoch line up
        per_epoch: dict[int, int] = {}
        for s in rows:
            per_epoch[s["epoch"]] = per_epoch.get(s["epoch"], 0) + 1
        seen: dict[int, int] = {}
        x = []
        for s in rows:
            i = seen.get(s["epoch"], 0)
            seen[s["epoch"]] = i + 1
            x.append(s["epoch"] + i / per_epoch[s["epoch"]])
        y = np.array([s[key] for s in rows], dtype=float)
        if smooth > 1 and len(y) >= smooth:
            y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
            x = x[smooth - 1:]
        series.append((np.array(x), y))
    if not series:
        return None
    n = min(len(y) for _x, y in series)
    ys = np.stack([y[:n] for _x, y in series])
    std = ys.std(axis=0, ddof=1) if len(series) > 1 else np.zeros(n)
    return series[0][0][:n], ys.mean(axis=0), std


def _multimodal(g: Group) -> bool:
    return all(r.config.get("modality", "both") == "both" for r in g.runs)


def dominant_modality(groups: list[Group]) -> str:
    """"audio" or "visual": the modality whose rho (s_u / s_other) is above 1 on average (geometric
    mean over every step of every multimodal run); ties and no data give "audio"."""
    logs = [np.log(s["rho_a"]) for g in groups if _multimodal(g) for r in g.runs for s in r.steps
            if s.get("rho_a") and s["rho_a"] > 0]
    return "visual" if logs and float(np.mean(logs)) < 0 else "audio"


def _modulation_window(groups: list[Group]):
    """(first, last + 1) epochs in which some plotted group's method modulated, or None."""
    spans = [(r.config.get("modulation_start", 0), r.config.get("modulation_end", 0) + 1)
             for g in groups if _multimodal(g) for r in g.runs
             if r.config.get("modulation") in ("ogm", "ge", "ogm-ge", "opm", "opm-ge")]
    if not spans:
        return None
    return min(a for a, _ in spans), max(b for _, b in spans)


def plot_rho(groups: list[Group], path, smooth: int = 5) -> Path:
    """Paper Figure 3 style: the discrepancy ratio of the dominant modality over training steps,
    one line per multimodal group, the modulation window shaded."""
    dom = dominant_modality(groups)
    key = "rho_a" if dom == "audio" else "rho_v"
    ratio = "s_a / s_v" if dom == "audio" else "s_v / s_a"
    fig, axes = _figure(1, f"{key} = {ratio} ({dom} dominates) per step, moving average, mean over seeds",
                        7.0)
    ax = axes[0]
    for i, g in enumerate(groups):
        if not _multimodal(g):
            continue        # unimodal runs have no discrepancy ratio
        curve = _step_curve(g.runs, key, smooth)
        if curve is None:
            curve = _epoch_curve(g.runs, lambda m: m.get(key))
        if curve is not None:
            _draw(ax, curve, g.label, _colour(i))
    ran = _epochs_run(groups)       # step x values run from 0 to the number of epochs run
    window = _modulation_window(groups)
    if window is not None and ran and window[0] < ran:
        lo, hi = window[0], min(window[1], ran)      # the band never extends past the run
        ax.axvspan(lo, hi, color="grey", alpha=0.12, label=f"modulated (epochs {lo}–{hi - 1})")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    _epoch_axis(ax, key, span=(0, ran) if ran else None)
    _legend(axes)
    return _save(fig, path)


def _epochs_run(groups: list[Group]) -> int:
    """Epochs the longest multimodal run of ``groups`` trained (0 when none has metrics)."""
    return max((max((int(m["epoch"]) + 1 for m in r.metrics if "epoch" in m), default=0)
                for g in groups if _multimodal(g) for r in g.runs), default=0)


def plot_loss(groups: list[Group], path) -> Path:
    """Train and validation loss per epoch, one line per group."""
    fig, axes = _figure(2, "loss per epoch (mean ± std over seeds)")
    for ax, split in zip(axes, ("train", "val")):
        for i, g in enumerate(groups):
            curve = _epoch_curve(g.runs, lambda m, s=split: (m.get(s) or {}).get("loss"))
            if curve is not None:
                _draw(ax, curve, g.label, _colour(i))
        _epoch_axis(ax, "cross-entropy", split)
    _legend(axes)
    return _save(fig, path)


def plot_seed_bars(series: dict[str, dict[int, float]], path, title: str, ylabel: str = "accuracy (%)",
                   note: str = "") -> Path:
    """Grouped bars per seed (one colour per series, values in percent) with each series' mean as a
    dashed line: a paired comparison readers can check seed by seed."""
    seeds = sorted(set().union(*(set(v) for v in series.values()))) if series else []
    fig, axes = _figure(1, title, max(5.0, 1.1 * len(seeds) + 2))
    ax = axes[0]
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, s in enumerate(seeds) if s in values]
        ys = [100 * values[s] for s in seeds if s in values]
        ax.bar(xs, ys, width, color=_colour(i), label=label)
        if ys:
            ax.axhline(float(np.mean(ys)), color=_colour(i), linestyle="--", linewidth=1)
    ax.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
    ax.set(ylabel=ylabel, xlabel=note or None)
    ax.grid(alpha=0.3, axis="y")
    _legend(axes)
    return _save(fig, path)


def plot_contrasts(contrasts: dict[str, dict], path, title: str) -> Path:
    """One row per contrast (``stats.paired_difference`` dicts): each seed's difference as a dot,
    the mean with its 95% t-interval as a bar, in points; a dashed line at 0."""
    labels = list(contrasts)
    fig, axes = _figure(1, title, 8.0, height=max(2.4, 0.55 * len(labels) + 1.6))
    ax = axes[0]
    for i, label in enumerate(labels):
        d = contrasts[label]
        y = len(labels) - 1 - i
        diffs = [100 * x for x in d.get("diffs") or []]
        if diffs:
            jitter = np.linspace(-0.15, 0.15, len(diffs)) if len(diffs) > 1 else np.zeros(1)
            ax.scatter(diffs, y + jitter, s=14, color="C0", alpha=0.6, label="one seed" if i == 0 else None,
                       zorder=2)
        if d.get("mean") is not None:
            lo, hi = (100 * d["ci"][0], 100 * d["ci"][1]) if d.get("ci") else (100 * d["mean"],) * 2
            ax.errorbar(100 * d["mean"], y, xerr=[[100 * d["mean"] - lo], [hi - 100 * d["mean"]]], fmt="D",
                        color="C3", capsize=4, label="mean, 95% CI" if i == 0 else None, zorder=3)
    ax.axvline(0.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_yticks(range(len(labels)), list(reversed(labels)))
    ax.set(xlabel="difference (points of accuracy)")
    ax.grid(alpha=0.3, axis="x")
    if labels:
        ax.set_ylim(-0.6, len(labels) - 0.4)
    _legend(axes)
    return _save(fig, path)


_MECHANISM_PANELS = (("rho_a", "rho_a = s_a / s_v"), ("k", "k_a (solid), k_v (dashed)"),
                     ("update_norm_a", "audio encoder update per step"),
                     ("update_norm_v", "visual encoder update per step"))


def plot_mechanism(curves: dict[str, dict[str, dict[int, float | None]]], path, *,
                   window: tuple[int, int] | None = None, whole_run=()) -> Path:
    """The modulation itself, per epoch: rho_a, k_a and k_v, and the norm of each encoder's
    parameter update per step (``curves``: arm -> key -> epoch -> mean over seeds; keys of
    ``demo.MECHANISM_KEYS``). ``window``: the modulated epochs (shaded; arms in ``whole_run``
    modulate every epoch). A panel whose values no run recorded says so."""
    fig, axes = _figure(2, "mechanism: discrepancy, coefficients and encoder updates per epoch (mean over seeds)",
                        4.6, nrows=2, height=2.9)
    last = max((e for c in curves.values() for vals in c.values() for e in vals), default=0)
    for ax, (key, title) in zip(axes, _MECHANISM_PANELS):
        drawn = False
        for i, (label, c) in enumerate(curves.items()):
            for k, style in ((("k_a", "-"), ("k_v", "--")) if key == "k" else ((key, "-"),)):
                pts = sorted((e, v) for e, v in c.get(k, {}).items() if v is not None)
                if pts:
                    ax.plot([e for e, _ in pts], [v for _, v in pts], style, color=_colour(i), marker=".",
                            label=label if k != "k_v" else None)
                    drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not recorded by this build", transform=ax.transAxes, ha="center", va="center",
                    color="grey")
        if window is not None and drawn:
            ax.axvspan(window[0] - 0.5, min(window[1], last) + 0.5, color="grey", alpha=0.12,
                       label="modulated epochs" + (f" ({', '.join(sorted(whole_run))}: every epoch)"
                                                   if whole_run else ""))
        if key == "rho_a" and drawn:
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        _epoch_axis(ax, "", title, span=(-0.5, last + 0.5))
    _legend(axes)
    return _save(fig, path)


def _legend(axes):
    """One legend for the figure, below the panels, so it never covers a curve; as many columns
    (at most 4) as the labels fit into the figure's width."""
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if labels:
        fig = axes[0].figure
        room = fig.get_figwidth() * _LEGEND_CHARS_PER_INCH
        ncols = min(len(labels), 4)
        # a column is as wide as its longest label plus the handle (~5 characters)
        while ncols > 1 and sum(sorted((len(lab) + 5 for lab in labels), reverse=True)[:ncols]) > room:
            ncols -= 1
        fig.legend([handles[lab] for lab in labels], labels, loc="outside lower center",
                   ncols=ncols, fontsize="small", frameon=False)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    return path


# ----------------------------------------------------------------------------- the report

def test_clips(groups: list[Group], split: str = "test") -> int | None:
    """Samples in ``split`` of the runs' shards (local folders only; None when unknown or when
    the runs used different data)."""
    counts = set()
    for g in groups:
        for r in g.runs:
            shards = r.config.get("shards") or ""
            path = Path(shards) / sf.manifest_name(split)
            if "://" in shards or not path.is_file():
                return None
            try:
                counts.add(sf.Manifest.from_json(path.read_bytes(), split, str(path)).num_samples)
            except (OSError, sf.ShardDataError):
                return None
    return counts.pop() if len(counts) == 1 else None


def clips_sentence(n: int | None, split: str = "test") -> str:
    if not n:
        return ""
    return f"The {split} split has {n} clips: one clip is {100 / n:.2f} points of accuracy."

def write_report(paths, out, *, title: str = "Training runs", split: str = "test",
                 preamble: str = "", conclusion: str = "", at: str = "selected") -> Report:
    """Read the runs (run or sweep folders), write ``out/report.md`` and three PNGs.

    ``preamble`` and ``conclusion`` are markdown put before and after the table (the demo
    passes its setup and a sentence generated from the numbers). ``at``: the table's epoch,
    "selected" (by val accuracy) or "last" (see ``run_values``). Returns the paths, the
    table rows and the groups, so callers can print or test them.
    """
    out = Path(out)
    runs = [read_run(p) for p in expand_runs(paths)]
    groups = group_runs(runs)
    rows = group_table(groups, at)
    plots = {"accuracy": plot_accuracy(groups, out / "accuracy.png", split),
             "rho": plot_rho(groups, out / "rho.png"),
             "loss": plot_loss(groups, out / "loss.png")}
    if any(row["shapley_a"][0] is not None for row in rows):
        plots["shapley"] = plot_shapley(groups, out / "shapley.png", split)
    parts = [f"# {title}\n"]
    if preamble:
        parts.append(preamble.rstrip() + "\n")
    if at == "last":
        how = "the last epoch (probes of last.pt)"
    else:
        test_selected = [r["label"] for r in rows if r.get("selection") in ("test", "mixed")]
        how = "the epoch selected by validation accuracy"
        if test_selected:
            how += (f" (for {', '.join(test_selected)}: the {SELECTION_LABELS['test']}, the epoch with the highest "
                    "test accuracy, which overstates it; such cells say so)")
    parts.append(f"Test metrics at {how}, in percent, "
                 "mean ± sample std over seeds. Unimodal accuracies come from each modality's "
                 "own logits; probe accuracies from a linear classifier fitted on the frozen "
                 "encoder's features. The Shapley columns are BalanceBenchmark's imbalance measure: "
                 "each modality's Shapley value of the fused accuracy, the other inputs zeroed "
                 "(accuracy points; the two sum to the accuracy gained over no input). A cell "
                 "without ± comes from one seed.\n")
    sentence = clips_sentence(test_clips(groups))
    if sentence:
        parts.append(sentence + "\n")
    parts.append(markdown_table(rows, at))
    if conclusion:
        parts.append(conclusion.rstrip() + "\n")
    parts.append("\n".join(f"![{name}]({p.name})" for name, p in plots.items()) + "\n")
    md = runfolder.atomic_write_text(out / "report.md", "\n".join(parts))
    return Report(md, plots, rows, groups)
