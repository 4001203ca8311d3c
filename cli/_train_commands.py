"""`ogmge-train train | evaluate`: argument parsing, progress and tables only."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ogmge_train.config import resolve
from ogmge_train.errors import ConfigError
from ogmge_train.names import SELECTION_LABELS

from . import _ui
from ._train_ui import TrainProgress, absolute_shards, choice, metrics_table, train_options


def train_interrupted() -> str:
    """The Ctrl-C hint of `train`: the typed command with --resume (and the run folder it made)."""
    if "--out" not in _ui.typed_arguments():      # interrupted before the run folder was made
        return _ui.render_hint(_ui.RESTART_HINT)
    return f"interrupted; finished epochs are kept: `{_ui.typed_command(['--resume'])}` continues from the last one"


@click.command("train")
@train_options()
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from last.pt (its config.json is the base; flags override it).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@_ui.handle_errors(interrupt_hint=train_interrupted)
def train_cmd(preset, resume, as_json, **explicit):
    """Train a model on shards into a run folder (README: Training)."""
    from ogmge_train.train import train

    if resume and not explicit["out"]:
        raise ConfigError("--resume needs --out RUN: the run folder to continue")
    base = _stored_config(explicit["out"]) if resume else None
    explicit["shards"] = absolute_shards(explicit["shards"])
    cfg = resolve(preset, base=base, **explicit)
    if not cfg.shards:
        raise ConfigError("--shards is required (the folder or URL written by `avprep extract`)")
    with TrainProgress() as progress:
        summary = train(cfg, resume=resume, on_event=progress)
    if not summary:  # ranks other than 0 stay quiet
        return
    if as_json:
        _ui.print_json(summary)
    else:
        how = {"val_acc": "by val accuracy", "test_acc": SELECTION_LABELS["test"]}.get(
            summary.get("selection"), "last epoch (no split to select on)")
        rows = {s: summary[s] for s in ("val", "test") if summary.get(s)}
        _ui.console.print(metrics_table(f"selected epoch {summary['selected_epoch']} ({how})", rows))


def _stored_config(out: str) -> dict | None:
    path = Path(out) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e


@click.command("evaluate")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--split", default="test", show_default=True, help="Split to score.")
@click.option("--which", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="Checkpoint: best.pt (the selected epoch) or last.pt.")
@click.option("--shards", show_default="the run's own",
              help="Evaluate on these shards (folder or URL) instead of the run's own.")
@click.option("--device", type=choice("device"), default="auto", show_default=True, help="Evaluation device.")
@click.option("--workers", type=click.IntRange(0), show_default="the run's own",
              help="Data loader processes.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the metrics as JSON on stdout (one run: its metrics; several: {run: metrics}).")
@_ui.handle_errors
def evaluate_cmd(runs, split, which, shards, device, workers, as_json):
    """Score a saved checkpoint of each RUN (a run folder, or a sweep folder: every seed) on one split."""
    from ogmge_train import report as report_lib
    from ogmge_train.train import evaluate

    results = {}
    with _ui.make_progress("batches", transient=True) as progress:
        for run in report_lib.expand_runs(runs):
            task = progress.add_task(f"evaluate {run} {split}", total=None)
            metrics = evaluate(run, split=split, which=which, shards=absolute_shards(shards), device=device,
                               workers=workers,
                               on_progress=lambda done, total, task=task: progress.update(task, completed=done,
                                                                                          total=total))
            if not metrics:
                raise ConfigError(f"{run}: split {split!r} has no samples")
            results[str(run)] = metrics
    if as_json:
        _ui.print_json(next(iter(results.values())) if len(results) == 1 else results)
    elif len(results) == 1:
        _ui.console.print(metrics_table(f"{next(iter(results))} ({which}.pt)", {split: next(iter(results.values()))}))
    else:
        table = metrics_table(f"{split} split ({which}.pt)", results)
        table.columns[0].header = "run"
        _ui.console.print(table)
