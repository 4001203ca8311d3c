"""Reproduce one of the OGM-GE paper's tables: its rows x seeds with the paper's settings, and a
report that puts our numbers next to the paper's.

The paper's values are data (``manifests/paper_tables.json``: all seven tables as printed, with
their datasets and metrics). Every table runs here (``TABLE_ROWS``); rows that are not built
say why (``NOT_BUILT_ROWS``: Table 4's i-vector and MWTSM). Row names are the manifest's keys:

- Table 1: Audio-only, Visual-only, the four fusion heads (the paper's "Baseline" is ``gated``),
  each fusion with OGM-GE (paired against the same fusion without).
- Table 2: concatenation, Modality-Drop audio / visual (on the input, as the paper's),
  Gradient-Blending, OGM, OGM-GE (paired against concatenation).
- Table 6: SGD and Adam, each without and with OGM-GE. The paper gives no Adam setting and the
  official code never builds Adam (its ``--optimizer`` is ignored); our choice: only the optimizer
  changes, i.e. ``torch.optim.Adam`` at the paper's lr 1e-3 with PyTorch's betas (0.9, 0.999),
  weight decay 1e-4 as L2 and the same StepLR schedule (``ADAM_CHOICE``).
- Table 3: TSN-AV, TSM-AV, TBN, PSP (``--model``, ogmge_train/frameworks), each with OGM-GE
  (paired against the same model without).
- Table 4: x-vector (``--audio-arch xvector``) with concatenation, with OGM-GE.
- Table 5: AVGA and PSP event localisation on AVE (``--task localisation``, preset
  ``paper-ave-loc``: one frame per 1 s segment), each with OGM-GE; accuracy = segment accuracy.
- Table 7: batch 64/128/256 x lr 1e-4/5e-4/1e-3 on concatenation without modulation, and GE alone.
  The grid is relative to the run's base batch and lr (``Row.scale``; 64 and 1e-3 in the paper
  presets), so a trial with ``--batch-size 8`` runs batches 8/16/32.

Every row is a sweep folder ``OUT/runs/<row>/seed-<k>`` (``sweep.sweep``: finished seeds are
kept, so re-running resumes and says which it kept). The report gives each row's test accuracy
twice: at the epoch selected on validation and at the best test epoch, as the reference code
selects (read from metrics.jsonl, where test metrics are recorded every epoch), so a reader sees
how much of the paper's figure is selection. ``OUT/report.md`` has the comparison, the usual
table and plots; ``OUT/reproduce.json`` the numbers.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from . import runfolder
from .errors import ConfigError
from .names import SELECTION_LABELS

__all__ = ["Row", "TABLE_ROWS", "NOT_RUNNABLE", "NOT_BUILT_ROWS", "TABLE_PRESETS", "PRESET_OF_DATASET", "ADAM_CHOICE",
           "paper_tables", "paper_values", "table_datasets", "listing", "unavailable", "reproduce", "ReproduceResult"]


@dataclass(frozen=True)
class Row:
    name: str              # the manifest's row key; its folder under OUT/runs
    settings: dict         # TrainConfig fields on top of the dataset's paper preset (fixed by the row)
    vs: str | None = None  # the row its paired difference is taken against
    scale: dict = field(default_factory=dict)   # TrainConfig fields multiplied into the base config
    paper_row: str | None = None   # a variant of a printed row: that row's manifest key (None: its own)

    @property
    def printed(self) -> str:
        """The manifest row whose paper value this row sits beside."""
        return self.paper_row or self.name


_CONCAT = {"fusion": "concat", "modulation": "none"}
_FUSIONS = ("gated", "concat", "sum", "film")
_DROP = {"fusion": "concat", "modulation": "modality-drop", "drop_at": "input"}
TABLE_ROWS: dict[int, tuple[Row, ...]] = {
    1: (Row("audio-only", {"modality": "audio", "modulation": "none"}),
        Row("visual-only", {"modality": "visual", "modulation": "none"}),
        *(Row(f, {"fusion": f, "modulation": "none"}) for f in _FUSIONS),
        *(Row(f"{f}+ogm-ge", {"fusion": f, "modulation": "ogm-ge"}, vs=f) for f in _FUSIONS)),
    2: (Row("concat", _CONCAT),
        Row("concat+modality-drop-audio", {**_DROP, "drop_modality": "audio"}, vs="concat"),
        Row("concat+modality-drop-visual", {**_DROP, "drop_modality": "visual"}, vs="concat"),
        Row("concat+gradient-blending", {"fusion": "concat", "modulation": "gradient-blending"}, vs="concat"),
        Row("concat+ogm", {"fusion": "concat", "modulation": "ogm"}, vs="concat"),
        Row("concat+ogm-ge", {"fusion": "concat", "modulation": "ogm-ge"}, vs="concat")),
    6: (Row("sgd", {**_CONCAT, "optimizer": "sgd"}),
        Row("sgd+ogm-ge", {"fusion": "concat", "modulation": "ogm-ge", "optimizer": "sgd"}, vs="sgd"),
        Row("adam", {**_CONCAT, "optimizer": "adam"}, vs="sgd"),
        Row("adam+ogm-ge", {"fusion": "concat", "modulation": "ogm-ge", "optimizer": "adam"}, vs="adam")),
    7: (Row("b64-lr1e-4", _CONCAT, vs="b64-lr1e-3", scale={"lr": 0.1}),
        Row("b64-lr5e-4", _CONCAT, vs="b64-lr1e-3", scale={"lr": 0.5}),
        Row("b64-lr1e-3", _CONCAT),
        Row("b128-lr1e-3", _CONCAT, vs="b64-lr1e-3", scale={"batch_size": 2}),
        Row("b256-lr1e-3", _CONCAT, vs="b64-lr1e-3", scale={"batch_size": 4}),
        # GE alone with the reference code's noise, then with the paper's (eq. 13's covariance),
        # both beside the one printed GE value
        Row("b64-lr1e-3+ge", {"fusion": "concat", "modulation": "ge"}, vs="b64-lr1e-3"),
        Row("b64-lr1e-3+ge-paper-noise", {"fusion": "concat", "modulation": "ge", "ge_noise": "paper"},
            vs="b64-lr1e-3", paper_row="b64-lr1e-3+ge")),
    # other frameworks' models (ogmge_train/frameworks), each without and with OGM-GE
    3: tuple(Row(name, {"model": m, "modulation": mod}, vs=None if mod == "none" else m)
             for mod in ("none", "ogm-ge") for m in ("tsn-av", "tsm-av", "tbn", "psp")
             for name in ((m if mod == "none" else f"{m}+ogm-ge"),)),
    4: (Row("x-vector", {"audio_arch": "xvector", "fusion": "concat", "modulation": "none"}),
        Row("x-vector+ogm-ge", {"audio_arch": "xvector", "fusion": "concat", "modulation": "ogm-ge"}, vs="x-vector")),
    5: tuple(Row(name, {"model": m, "task": "localisation", "modulation": mod}, vs=None if mod == "none" else m)
             for m in ("avga", "psp") for mod in ("none", "ogm-ge")
             for name in ((m if mod == "none" else f"{m}+ogm-ge"),)),
}
# Tables this build cannot run, and why (none left).
NOT_RUNNABLE: dict[int, str] = {}
# Rows of runnable tables that are not built, and why.
_IVECTOR = ("i-vector (Heracleous & Yoneyama 2019): the paper's text is not reachable from here (only "
            "citations), and an i-vector front-end needs a UBM and a total-variability matrix trained with "
            "settings only the paper gives; not built")
_MWTSM = ("MWTSM (Ghaleb, Popa, Asteriadis, ACII 2019): only the abstract is reachable here (its metric-learning "
          "embedding, temporal windows and layers are not given); not built")
NOT_BUILT_ROWS: dict[int, dict[str, str]] = {
    4: {"i-vector": _IVECTOR, "i-vector+ogm-ge": _IVECTOR, "mwtsm": _MWTSM, "mwtsm+ogm-ge": _MWTSM},
}
# The preset of a table whose task differs from the dataset's usual one (AVE localisation).
TABLE_PRESETS = {5: {"ave": "paper-ave-loc"}}
PRESET_OF_DATASET = {"cremad": "paper-cremad", "kinetics-sounds": "paper-ks", "vggsound": "paper-vggsound",
                     "ave": "paper-ave"}
ADAM_CHOICE = ("Adam rows: torch.optim.Adam at the paper's lr 1e-3, PyTorch's betas (0.9, 0.999), weight "
               "decay 1e-4 as L2 and the same StepLR as SGD (only the optimizer changes); the paper gives "
               "no Adam setting and the official code never builds Adam.")
_TABLE_NOTES = {
    2: "Modality-Drop rows drop the input (`drop_at=input`), as the paper's.",
    6: ADAM_CHOICE,
    3: "Other frameworks' models on this build's encoders (README: Models of other frameworks); unimodal "
       "scores for OGM are exact for TSN-AV/TSM-AV and by mean substitution for TBN and PSP.",
    4: "The x-vector TDNN as the audio encoder with concatenation fusion; i-vector and MWTSM are not built "
       "(reasons below).",
    5: "Event localisation on AVE: accuracy is the segment accuracy (right 1 s segments over all segments, "
       "the AVE papers' metric); encoders trained from scratch (the papers use fixed VGG-19/VGGish features: "
       "--encoder-weights and --freeze-encoders take a state dict of one's own).",
    7: "The grid scales the base batch and lr (the paper's presets: 64 and 1e-3). GE alone runs twice: "
       "`b64-lr1e-3+ge` with the reference code's noise (i.i.d. per entry, the tensor's gradient std, "
       "independent of the batch size) and `b64-lr1e-3+ge-paper-noise` with the paper's eq. 13 noise "
       "(`--ge-noise paper`: the mini-batch gradient covariance, shrinking as 1/batch); both sit beside "
       "the paper's one GE value.",
}


# ----------------------------------------------------------------------------- the paper's values

def paper_tables() -> dict:
    """The manifest (``manifests/paper_tables.json``)."""
    return json.loads(resources.files("manifests").joinpath("paper_tables.json").read_text(encoding="utf-8"))


def table_datasets(table: int) -> list[str]:
    """The datasets a paper table reports, in column order."""
    cols = paper_tables()["tables"][str(table)]["columns"]
    return list(dict.fromkeys(c.rpartition(".")[0] for c in cols))


def paper_values(table: int, dataset: str) -> dict[str, dict[str, float]]:
    """Row name -> {metric: percent} of the paper's table for ``dataset`` ({} where it has no column)."""
    tab = paper_tables()["tables"][str(table)]
    out = {}
    for name, row in tab["rows"].items():
        out[name] = {col.rpartition(".")[2]: v for col, v in zip(tab["columns"], row["values"])
                     if col.rpartition(".")[0] == dataset}
    return out


def unavailable(name: str, settings: dict) -> str | None:
    """Why a row/arm cannot run with this build (unknown setting or method), or None."""
    from .config import CHOICES, FIELDS

    unknown = sorted(set(settings) - FIELDS)
    if unknown:
        return f"{name}: this build has no setting {', '.join(k.replace('_', '-') for k in unknown)}"
    for key, value in settings.items():
        if key in CHOICES and value not in CHOICES[key]:
            return f"{name}: this build has no --{key.replace('_', '-')} {value!r}"
    return None


def listing() -> list[dict]:
    """Every table of the paper: ``table``, ``title``, ``columns``, ``reason`` (None when it runs
    here) and ``rows`` (``name``, ``label``, ``values`` {column: percent}, ``reason``: None when
    this build can run the row)."""
    tables = []
    for key, tab in paper_tables()["tables"].items():
        t = int(key)
        rows_here = {r.name: r for r in TABLE_ROWS.get(t, ())}
        reason = NOT_RUNNABLE.get(t)
        rows = []
        for name, row in tab["rows"].items():
            why = reason or NOT_BUILT_ROWS.get(t, {}).get(name)
            if why is None:
                why = "no such row in this build" if name not in rows_here else \
                    unavailable(name, rows_here[name].settings)
            rows.append({"name": name, "label": row["label"], "values": dict(zip(tab["columns"], row["values"])),
                         "reason": why})
        tables.append({"table": t, "title": tab["title"], "columns": list(tab["columns"]), "reason": reason,
                       "rows": rows})
    return tables


# ----------------------------------------------------------------------------- running a table

@dataclass
class ReproduceResult:
    report: Path                    # OUT/report.md
    numbers: Path                   # OUT/reproduce.json
    rows: list[dict]                # per row: name, seeds, val/test-selected metrics, paper, paired diff
    skipped: dict[str, str]         # row name -> reason
    kept: list[tuple[str, int]]     # (row, seed) finished by an earlier run, not retrained


def _dataset_name(shards: str, s3_endpoint: str | None) -> str:
    from .data import read_dataset

    return read_dataset(shards, s3_endpoint=s3_endpoint).name


def _scaled(cfg, row: Row):
    """``cfg`` with the row's multiplied fields (Table 7's grid)."""
    changes = {}
    for key, factor in row.scale.items():
        value = getattr(cfg, key) * factor
        changes[key] = max(1, round(value)) if isinstance(getattr(cfg, key), int) else float(f"{value:.12g}")
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _check_request(table: int, overrides: dict, missing: str) -> None:
    """A table this build runs, a known ``missing``, and no override of what the table's rows set."""
    if table not in TABLE_ROWS:
        if table in NOT_RUNNABLE:
            raise ConfigError(f"Table {table} cannot run in this build: {NOT_RUNNABLE[table]}")
        raise ConfigError(f"--table must be one of {', '.join(map(str, sorted(TABLE_ROWS)))}, not {table!r}")
    if missing not in ("skip", "fail"):
        raise ConfigError(f"missing must be skip or fail, not {missing!r}")
    fixed = sorted(({"seed", "out", "shards"} | {k for r in TABLE_ROWS[table] for k in r.settings}) & set(overrides))
    if fixed:
        raise ConfigError(f"Table {table}'s rows set {', '.join('--' + k.replace('_', '-') for k in fixed)}; "
                          "it cannot be overridden")


def _runnable_rows(table: int, overrides: dict, missing: str) -> tuple[list[Row], dict[str, str]]:
    """The rows of ``table`` this build can run, and why each other row is skipped (a
    ConfigError with ``missing="fail"`` when there is any, or when no row is left)."""
    rows, skipped = [], dict(NOT_BUILT_ROWS.get(table, {}))
    for row in TABLE_ROWS[table]:
        reason = unavailable(row.name, {**overrides, **row.settings})
        if reason is None:
            rows.append(row)
        else:
            skipped[row.name] = reason
    if skipped and missing == "fail":
        raise ConfigError("rows this build cannot run: " + "; ".join(skipped.values()))
    if not rows:
        raise ConfigError("no row of table {} can run: {}".format(table, "; ".join(skipped.values())))
    return rows, skipped


def _paper_preset(table: int, dataset: str, shards: str) -> str:
    """The table's preset for ``dataset``, else the dataset's paper preset."""
    preset = TABLE_PRESETS.get(table, {}).get(dataset) or PRESET_OF_DATASET.get(dataset)
    if preset is None:
        raise ConfigError(f"{shards}: dataset {dataset!r} has no paper preset; pass --preset "
                          f"(the paper's: {', '.join(f'{d} -> {p}' for d, p in PRESET_OF_DATASET.items())})")
    return preset


def reproduce(table: int, shards: str, out, *, seeds=(0, 1, 2), overrides: dict | None = None,
              on_event: Callable[[dict], None] | None = None, preset: str | None = None,
              missing: str = "skip") -> ReproduceResult:
    """Run table ``table``'s rows x ``seeds`` on ``shards`` into ``out`` and write the report.

    ``preset`` defaults to the dataset's paper preset (``PRESET_OF_DATASET``); ``overrides``
    (TrainConfig fields) go on top of it, e.g. fewer epochs for a trial, or ``select_on="test"``
    for the reference code's protocol; a field a row of the table fixes cannot be overridden.
    ``missing``: "skip" rows this build cannot run (``on_event`` gets ``{"event": "skip", "row",
    "reason"}``), or "fail" with a ConfigError listing them before any training.
    ``on_event`` also receives ``{"event": "run", "row", "seed", "index", "total", "kept"}``
    before each row and seed (``kept``: finished by an earlier run, not retrained) and every
    training event (``train.train``'s) in between.
    """
    from .config import resolve
    from .report import write_report
    from .sweep import sweep

    _check_request(table, overrides or {}, missing)
    emit = on_event or (lambda e: None)
    overrides = dict(overrides or {})
    seeds = list(seeds)
    if not seeds:
        raise ConfigError("--seeds: at least one seed")
    shards = runfolder.absolute_location(shards)
    rows, skipped = _runnable_rows(table, overrides, missing)
    for name, reason in skipped.items():
        emit({"event": "skip", "row": name, "reason": reason})
    dataset = _dataset_name(shards, overrides.get("s3_endpoint"))
    if preset is None:
        preset = _paper_preset(table, dataset, shards)
    out = Path(out)
    configs = {row.name: _scaled(resolve(preset, **{**overrides, **row.settings, "shards": shards,
                                                    "out": str(out / "runs" / row.name)}), row)
               for row in rows}
    total, index, kept = len(rows) * len(seeds), 0, []
    for row in rows:
        cfg = configs[row.name]
        for seed in seeds:
            done = runfolder.finished(runfolder.seed_dir(cfg.out, seed), cfg.epochs)
            if done:
                kept.append((row.name, seed))
            emit({"event": "run", "row": row.name, "seed": seed, "index": index, "total": total, "kept": done})
            sweep(dataclasses.replace(cfg, seed=seed), [seed], on_event=on_event)
            index += 1

    summary = _summarise(table, dataset, rows, configs, out, seeds)
    select_on = configs[rows[0].name].select_on
    numbers = runfolder.atomic_write_json(out / "reproduce.json", {
        "table": table, "dataset": dataset, "preset": preset, "overrides": overrides, "seeds": seeds,
        "select_on": select_on, "rows": summary, "skipped": skipped, "kept": [list(k) for k in kept]})
    rep = write_report([out / "runs" / row.name for row in rows], out,
                       title=f"OGM-GE paper, Table {table} ({dataset})",
                       preamble=_preamble(table, dataset, preset, overrides, seeds, skipped, kept),
                       conclusion=_paper_table(table, dataset, summary, select_on))
    return ReproduceResult(rep.markdown, numbers, summary, skipped, kept)


# ----------------------------------------------------------------------------- numbers

def _at_best(run, on: str) -> dict | None:
    """Test metrics (and ``epoch``) at the first epoch with the highest ``on``-split accuracy."""
    rows = [m for m in run.metrics if (m.get(on) or {}).get("acc") is not None]
    if not rows:
        return None
    best = max(rows, key=lambda m: m[on]["acc"])        # max keeps the first of equal values
    return {"epoch": best["epoch"], **(best.get("test") or {})}


def _per_seed(runs, on: str, key: str) -> dict[int, float]:
    out = {}
    for r in runs:
        picked = _at_best(r, on)
        if picked is not None and picked.get(key) is not None:
            out[int(r.config.get("seed", 0))] = float(picked[key])
    return out


def _summarise(table, dataset, rows, configs, out, seeds) -> list[dict]:
    from .report import read_run
    from .stats import mean_std, paired_difference

    groups = {row.name: [read_run(p) for p in runfolder.expand_runs([out / "runs" / row.name])
                         if int(runfolder.read_config(p).get("seed", -1)) in seeds] for row in rows}
    paper = paper_values(table, dataset)
    summary = []
    for row in rows:
        runs, cfg = groups[row.name], configs[row.name]
        entry = {"name": row.name, "settings": row.settings, "batch_size": cfg.batch_size, "lr": cfg.lr,
                 "seeds": [int(r.config["seed"]) for r in runs], "paper": paper.get(row.printed, {})}
        for on in ("val", "test"):          # selected on validation; best test epoch (the reference code's)
            entry[on] = {key: mean_std(list(_per_seed(runs, on, key).values())) for key in ("acc", "map", "epoch")}
        if row.vs is not None and row.vs in groups:
            on = cfg.select_on
            d = paired_difference(_per_seed(groups[row.vs], on, "acc"), _per_seed(runs, on, "acc"))
            entry["vs"] = {"row": row.vs, "mean": d["mean"], "ci": d["ci"], "n": d["n"], "on": cfg.select_on}
        summary.append(entry)
    return summary


# ----------------------------------------------------------------------------- the report

def _cell(ms) -> str:
    from .report import format_cell

    return format_cell("acc", ms)


def _paper(x) -> str:
    return "—" if x is None else f"{x:.1f}"


def _paper_table(table: int, dataset: str, summary: list[dict], select_on: str) -> str:
    has_map = any("map" in e["paper"] for e in summary)
    reported = dataset in table_datasets(table)
    head = ["row", "seeds", f"acc, {SELECTION_LABELS['val']}", f"acc, {SELECTION_LABELS['test']}", "acc (paper)"]
    if has_map:
        head += [f"mAP, {SELECTION_LABELS['val']}", f"mAP, {SELECTION_LABELS['test']}", "mAP (paper)"]
    head.append(f"paired Δ acc ({SELECTION_LABELS[select_on]}) vs")
    lines = ["## Against the paper", "",
             "Ours: test metrics in percent, mean ± sample std over seeds, twice: at the epoch "
             f"{SELECTION_LABELS['val']} and at the {SELECTION_LABELS['test']} (the epoch with the highest "
             "test accuracy, which is how the reference code picks its figure; it overstates test accuracy). "
             "The gap between the two is what selection on the test set adds. Paper: the value it prints "
             "(`manifests/paper_tables.json`). Paired difference: accuracy minus the reference row's, seed by "
             "seed, with a 95% t-interval over seeds.", ""]
    if not reported:
        lines += [f"The paper's Table {table} reports {', '.join(table_datasets(table))}; it has no value for "
                  f"`{dataset}` (shown as —).", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    grid = any(r.scale for r in TABLE_ROWS[table])
    for e in summary:
        label = e["name"] + (f" (batch {e['batch_size']}, lr {e['lr']:g})" if grid else "")
        cells = [label, str(len(e["seeds"])), _cell(e["val"]["acc"]), _cell(e["test"]["acc"]),
                 _paper(e["paper"].get("acc", e["paper"].get("loc_acc")))]
        if has_map:
            cells += [_cell(e["val"]["map"]), _cell(e["test"]["map"]), _paper(e["paper"].get("map"))]
        vs = e.get("vs")
        if vs and vs["mean"] is not None:
            ci = "" if vs["ci"] is None else f" [{100 * vs['ci'][0]:+.1f}, {100 * vs['ci'][1]:+.1f}]"
            cells.append(f"{100 * vs['mean']:+.1f}{ci} vs `{vs['row']}`")
        else:
            cells.append("—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"



def _preamble(table, dataset, preset, overrides, seeds, skipped, kept) -> str:
    title = paper_tables()["tables"][str(table)]["title"]
    parts = [f"The paper's Table {table}: {title}.",
             f"Dataset `{dataset}`, preset `{preset}`"
             + (f" with {', '.join(f'{k}={v}' for k, v in sorted(overrides.items()))}" if overrides else "")
             + f", seeds {', '.join(map(str, seeds))}."]
    if table in _TABLE_NOTES:
        parts.append(_TABLE_NOTES[table])
    if skipped:
        parts.append("Rows not run (this build lacks them): " + "; ".join(skipped.values()) + ".")
    if kept:
        parts.append("Kept from an earlier run (finished, not retrained): "
                     + ", ".join(f"{r} seed {s}" for r, s in kept) + ".")
    return "\n\n".join(parts) + "\n"
