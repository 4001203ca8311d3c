"""Reproduce one of the OGM-GE paper's tables: its rows x seeds with the paper's settings, and a
report that puts our numbers next to the paper's.

Table 1 compares the fusion heads (concat, sum, FiLM, gated) without and with OGM-GE; Table 2
compares, on concatenation, plain training with Modality-Drop (audio / visual), Gradient-Blending,
OGM and OGM-GE. Rows are named by method; a row whose method or setting this build does not
have is skipped with the reason (or, with ``missing="fail"``, refused before anything runs).
The paper's values are data (``manifests/paper_tables.json``); values we could not verify
against the paper are stored as null and shown as "?" (never guessed).

Each row is a sweep folder ``OUT/runs/<row>/seed-<k>`` (``sweep.sweep``: finished seeds are
kept, so re-running resumes); ``OUT/report.md`` has the usual table and plots plus the paper
comparison, and ``OUT/reproduce.json`` the numbers.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import runfolder
from .errors import ConfigError

__all__ = ["Row", "TABLE_ROWS", "PRESET_OF_DATASET", "paper_values", "unavailable", "reproduce",
           "ReproduceResult"]


@dataclass(frozen=True)
class Row:
    name: str          # the row's method name; its folder under OUT/runs
    settings: dict     # TrainConfig fields on top of the dataset's paper preset


_FUSIONS = ("concat", "sum", "film", "gated")
TABLE_ROWS: dict[int, tuple[Row, ...]] = {
    1: tuple(Row(name, {"fusion": f, "modulation": m})
             for f in _FUSIONS for name, m in ((f, "none"), (f"{f}+ogm-ge", "ogm-ge"))),
    2: (Row("concat", {"fusion": "concat", "modulation": "none"}),
        Row("modality-drop-audio", {"fusion": "concat", "modulation": "modality-drop", "drop_modality": "audio"}),
        Row("modality-drop-visual", {"fusion": "concat", "modulation": "modality-drop",
                                     "drop_modality": "visual"}),
        Row("gradient-blending", {"fusion": "concat", "modulation": "gradient-blending"}),
        Row("ogm", {"fusion": "concat", "modulation": "ogm"}),
        Row("ogm-ge", {"fusion": "concat", "modulation": "ogm-ge"})),
}
# The baseline of each table's paired differences.
_BASELINE = {1: None, 2: "concat"}
PRESET_OF_DATASET = {"cremad": "paper-cremad", "kinetics-sounds": "paper-ks"}


def paper_values(table: int, dataset: str) -> dict[str, dict]:
    """Row name -> {"acc", "map"} (percent, None where not verified) of the paper's table."""
    data = json.loads(resources.files("manifests").joinpath("paper_tables.json").read_text())
    rows = data["tables"][str(table)]["rows"]
    return {name: dict(v.get(dataset) or {"acc": None, "map": None}) for name, v in rows.items()}


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


@dataclass
class ReproduceResult:
    report: Path                    # OUT/report.md
    numbers: Path                   # OUT/reproduce.json
    rows: list[dict]                # per row: name, ours (acc/map mean, std), paper, paired diff
    skipped: dict[str, str]         # row name -> reason


def _dataset_name(shards: str, s3_endpoint: str | None) -> str:
    from .data import read_dataset

    return read_dataset(shards, s3_endpoint=s3_endpoint).name


def reproduce(table: int, shards: str, out, *, seeds=(0, 1, 2), overrides: dict | None = None,
              on_event: Callable[[dict], None] | None = None, preset: str | None = None,
              missing: str = "skip") -> ReproduceResult:
    """Run table ``table``'s rows x ``seeds`` on ``shards`` into ``out`` and write the report.

    ``preset`` defaults to the dataset's paper preset (``PRESET_OF_DATASET``); ``overrides``
    (TrainConfig fields) go on top of it and of each row's settings, e.g. fewer epochs for a
    trial. ``missing``: "skip" rows this build cannot run (``on_event`` gets ``{"event":
    "skip", "row", "reason"}``), or "fail" with a ConfigError listing them before any training.
    ``on_event`` also receives ``{"event": "run", "row", "seed", "index", "total"}`` before each
    training and every training event (``train.train``'s) in between.
    """
    from .config import resolve
    from .report import mean_std, paired_difference, per_seed, read_run, write_report
    from .sweep import sweep

    if table not in TABLE_ROWS:
        raise ConfigError(f"--table must be one of {', '.join(map(str, TABLE_ROWS))}, not {table!r}")
    if missing not in ("skip", "fail"):
        raise ConfigError(f"missing must be skip or fail, not {missing!r}")
    emit = on_event or (lambda e: None)
    overrides = dict(overrides or {})
    seeds = list(seeds)
    if not seeds:
        raise ConfigError("--seeds: at least one seed")
    shards = runfolder.absolute_location(shards)
    rows, skipped = [], {}
    for row in TABLE_ROWS[table]:
        reason = unavailable(row.name, {**row.settings, **overrides})
        if reason is None:
            rows.append(row)
        else:
            skipped[row.name] = reason
    if skipped and missing == "fail":
        raise ConfigError("rows this build cannot run: " + "; ".join(skipped.values()))
    if not rows:
        raise ConfigError("no row of table {} can run: {}".format(table, "; ".join(skipped.values())))
    for name, reason in skipped.items():
        emit({"event": "skip", "row": name, "reason": reason})

    dataset = _dataset_name(shards, overrides.get("s3_endpoint"))
    if preset is None:
        preset = PRESET_OF_DATASET.get(dataset)
        if preset is None:
            raise ConfigError(f"{shards}: dataset {dataset!r} is in neither paper table; pass a preset "
                              f"(the paper's: {', '.join(f'{d} -> {p}' for d, p in PRESET_OF_DATASET.items())})")
    out = Path(out)
    configs = {row.name: resolve(preset, **{**row.settings, **overrides, "shards": shards,
                                            "out": str(out / "runs" / row.name)}) for row in rows}
    total, index = len(rows) * len(seeds), 0
    for row in rows:
        for seed in seeds:
            emit({"event": "run", "row": row.name, "seed": seed, "index": index, "total": total})
            sweep(dataclasses.replace(configs[row.name], seed=seed), [seed], on_event=on_event)
            index += 1

    folders = [out / "runs" / row.name for row in rows]
    groups = {row.name: [read_run(p) for p in runfolder.expand_runs([f])
                         if int(runfolder.read_config(p).get("seed", -1)) in seeds]
              for row, f in zip(rows, folders)}
    paper = paper_values(table, dataset)
    base = _BASELINE[table]
    summary = []
    for row in rows:
        runs = groups[row.name]
        entry = {"name": row.name, "settings": row.settings, "seeds": [int(r.config["seed"]) for r in runs],
                 "paper": paper.get(row.name, {"acc": None, "map": None})}
        for key in ("acc", "map"):
            vals = per_seed(runs, key)
            entry[key] = mean_std(list(vals.values()))
        ref = base if base is not None else _table1_reference(row)
        if ref is not None and ref != row.name and ref in groups:
            d = paired_difference(per_seed(groups[ref], "acc"), per_seed(runs, "acc"))
            entry["vs"] = {"row": ref, "mean": d["mean"], "ci": d["ci"], "n": d["n"]}
        summary.append(entry)
    numbers = runfolder.atomic_write_json(out / "reproduce.json", {
        "table": table, "dataset": dataset, "preset": preset, "overrides": overrides, "seeds": seeds,
        "rows": summary, "skipped": skipped})
    rep = write_report(folders, out, title=f"OGM-GE paper, Table {table} ({dataset})",
                       preamble=_preamble(table, dataset, preset, overrides, seeds, skipped),
                       conclusion=_paper_table(summary))
    return ReproduceResult(rep.markdown, numbers, summary, skipped)


def _table1_reference(row: Row) -> str | None:
    """Table 1 pairs each fusion with OGM-GE against the same fusion without."""
    return row.settings["fusion"] if row.settings.get("modulation") == "ogm-ge" else None


def _cell(ms) -> str:
    from .report import format_cell

    return format_cell("acc", ms)


def _paper(x) -> str:
    return "?" if x is None else f"{x:.1f}"


def _paper_table(summary: list[dict]) -> str:
    lines = ["## Against the paper", "",
             "Ours: test metrics at the epoch selected on validation, mean ± sample std over seeds. "
             "Paper: its reported value; \"?\" where we have not verified it (see "
             "`manifests/paper_tables.json`). Paired difference: accuracy minus the reference row's, "
             "seed by seed, with a 95% t-interval over seeds.", "",
             "| row | seeds | acc (ours) | acc (paper) | mAP (ours) | mAP (paper) | paired Δ acc vs |",
             "|---|---|---|---|---|---|---|"]
    for e in summary:
        vs = e.get("vs")
        if vs and vs["mean"] is not None:
            ci = "" if vs["ci"] is None else f" [{100 * vs['ci'][0]:+.1f}, {100 * vs['ci'][1]:+.1f}]"
            diff = f"{100 * vs['mean']:+.1f}{ci} vs `{vs['row']}`"
        else:
            diff = "—"
        lines.append(f"| {e['name']} | {len(e['seeds'])} | {_cell(e['acc'])} | {_paper(e['paper'].get('acc'))} | "
                     f"{_cell(e['map'])} | {_paper(e['paper'].get('map'))} | {diff} |")
    return "\n".join(lines) + "\n"


def _preamble(table, dataset, preset, overrides, seeds, skipped) -> str:
    parts = [f"Dataset `{dataset}`, preset `{preset}`"
             + (f" with {', '.join(f'{k}={v}' for k, v in sorted(overrides.items()))}" if overrides else "")
             + f", seeds {', '.join(map(str, seeds))}."]
    if skipped:
        parts.append("Rows not run (this build lacks them): " + "; ".join(skipped.values()) + ".")
    return "\n\n".join(parts) + "\n"
