"""One configuration over several seeds: ``OUT/seed-<k>`` run folders, then mean ± std.

Each seed is an ordinary run (``train.train``) in its own folder, so a sweep can be resumed
(finished seeds, those whose ``summary.json`` counts at least the configured epochs, are
skipped; an interrupted one continues from its ``last.pt``), probed and reported like any run.
Seeds run one after the other: on one machine parallel runs only compete for the same cores.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from . import runfolder
from .config import TrainConfig
from .errors import ConfigError, RunFolderError
from .report import group_runs, group_table, read_run

__all__ = ["parse_seeds", "seed_dir", "sweep", "aggregate"]


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-2"`` (or a mix, e.g. ``"0-2,7"``) -> [0, 1, 2(, 7)]; seeds are >= 0."""
    seeds: list[int] = []
    for part in str(text).split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            seeds.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ConfigError(f"--seeds: {part.strip()!r} is not a seed or a range like 0-2") from None
    if not seeds:
        raise ConfigError(f"--seeds: no seed in {text!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: repeated seed in {text!r}")
    return seeds


seed_dir = runfolder.seed_dir


def sweep(cfg: TrainConfig, seeds, *, on_event: Callable[[dict], None] | None = None,
          on_run: Callable[[int, int, int, Path], None] | None = None) -> list[dict]:
    """Train ``cfg`` once per seed into ``cfg.out/seed-<k>``; returns the summaries in seed order.

    ``on_run(index, total, seed, folder)`` is called before each seed (also for skipped ones);
    ``on_event`` is passed to ``train``. Finished seeds are not retrained. A local ``shards``
    folder is recorded as an absolute path, as ``train`` records it, so every seed folder can be
    evaluated and probed from any directory.
    """
    from .train import train

    if not cfg.out:
        raise ConfigError("--out is required: the sweep folder (one seed-<k> folder per seed)")
    cfg = dataclasses.replace(cfg, shards=runfolder.absolute_location(cfg.shards))
    seeds = list(seeds)
    summaries = []
    for i, seed in enumerate(seeds):
        run = seed_dir(cfg.out, seed)
        if on_run is not None:
            on_run(i, len(seeds), seed, run)
        summary = runfolder.read_summary(run) if runfolder.finished(run, cfg.epochs) else None
        if summary is not None:
            summaries.append(summary)
            continue
        resume = runfolder.checkpoint_path(run, "last").exists()
        summaries.append(train(dataclasses.replace(cfg, seed=seed, out=str(run)), resume=resume,
                               on_event=on_event))
    return summaries


def aggregate(out) -> dict:
    """The mean ± std row (``report.group_table``) of the seeds in sweep folder ``out``."""
    try:   # numeric seed order, the same listing the report uses
        seeds = [p for p in runfolder.expand_runs([out]) if p != Path(out)]
    except RunFolderError:
        seeds = []
    if not seeds:
        raise ConfigError(f"{out}: no seed-<k> run folders")
    runs = [read_run(p) for p in seeds]
    rows = group_table(group_runs(runs))
    if len(rows) != 1:
        raise ConfigError(f"{out}: the seed folders hold {len(rows)} different configurations")
    return rows[0]
