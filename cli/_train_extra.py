"""`ogmge-train probe | report | sweep`: front-ends of ogmge_train.probe / report / sweep.

Loaded lazily by ``cli.train_cli`` (``_DefaultToTrain.get_command``). ``sweep`` takes every option of
``train`` (the same click options, reused) plus ``--seeds``.
"""
from __future__ import annotations

import click

from ogmge_train import report as report_lib
from ogmge_train.probe import MODALITIES

from ._ui import console, err_console, handle_errors, make_progress, print_json, table
from . import train_cli
from .train_cli import _TrainProgress, train_cmd

_NUMERIC = set(range(1, len(report_lib.COLUMNS) + 1))


def _summary_table(title: str, rows: list[dict]):
    """The report's mean ± std rows as a rich table."""
    head = ["run", *(t for t, _ in report_lib.COLUMNS)]
    body = ([r["label"], r["n"], *(report_lib.format_cell(k, r[k]) for _t, k in report_lib.COLUMNS[1:])]
            for r in rows)
    return table(title, head, body, numeric=_NUMERIC)


# ----------------------------------------------------------------------------- probe

@click.command("probe")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--modality", type=click.Choice(MODALITIES), multiple=True,
              help="Encoder(s) to probe (repeatable; default: every encoder the run has).")
@click.option("--split", default="test", show_default=True, help="Split the probe is scored on.")
@click.option("--which", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option("--epochs", "steps", type=click.IntRange(1), default=100, show_default=True,
              help="Full-batch L-BFGS iterations of the linear fit.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@handle_errors
def probe_cmd(runs, modality, split, which, steps, batch_size, workers, device, as_json):
    """Fit a linear classifier on the frozen encoder features of each RUN (or sweep folder).

    Writes RUN/probe_<modality>.json; `ogmge-train report` shows it."""
    from ogmge_train.probe import probe

    results = []
    for run in report_lib.expand_runs(runs):
        config = report_lib.read_run(run).config
        have = [m for m in MODALITIES if config.get("modality", "both") in ("both", m)]
        for m in modality or have:
            if m not in have:
                raise click.UsageError(f"{run}: trained with modality={config.get('modality')!r}, "
                                       f"it has no {m} encoder")
            results.append((run, _probe_one(probe, run, m, split=split, which=which, steps=steps,
                                            batch_size=batch_size, workers=workers, device=device)))
    if as_json:
        print_json({f"{run}:{r.modality}": r.results for run, r in results})
        return
    rows = [[str(run), r.modality, r.results["l2"],
             *(f"{100 * r.results[s]['acc']:.1f}" if s in r.results else "—" for s in ("train", "val", split))]
            for run, r in results]
    console.print(table("linear probe accuracy (%)", ["run", "encoder", "L2", "train", "val", split], rows,
                        numeric={2, 3, 4, 5}))


def _probe_one(probe, run, modality, **kw):
    with make_progress("samples") as progress:
        tasks = {}

        def on_progress(stage, done, total):
            if stage not in tasks:
                what = "fitting (L2 grid)" if stage == "fit" else f"{modality} features, {stage.split(':')[1]}"
                tasks[stage] = progress.add_task(f"{run.name} {what}", total=total)
            progress.update(tasks[stage], completed=done, total=total)

        return probe(run, modality, on_progress=on_progress, **kw)


# ----------------------------------------------------------------------------- report

@click.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for report.md and PNGs.")
@click.option("--title", default="Training runs", show_default=True)
@click.option("--split", default="test", show_default=True, help="Split of the accuracy plot.")
@handle_errors
def report_cmd(runs, out, title, split):
    """Compare RUNs (run folders or sweep folders): markdown table + accuracy / rho / loss plots.

    Runs whose configurations differ only in the seed are one row (mean ± std)."""
    try:
        rep = report_lib.write_report(runs, out, title=title, split=split)
    except report_lib.ReportError as e:
        raise click.UsageError(str(e)) from None
    console.print(_summary_table(title, rep.table))
    err_console.print(f"wrote {rep.markdown} and {', '.join(p.name for p in rep.plots.values())}")


# ----------------------------------------------------------------------------- sweep

_NOT_SWEPT = {"resume", "seed", "as_json"}


@click.command("sweep")
@click.option("--seeds", required=True, help="Seeds to run, e.g. 0,1,2 or 0-4.")
@click.option("--json", "as_json", is_flag=True, help="Print the mean ± std row as JSON.")
@handle_errors
def sweep_cmd(seeds, as_json, preset, **explicit):
    """Train one configuration once per seed into OUT/seed-<k>, then show mean ± std.

    Takes every option of `train`. Finished seeds are skipped, so re-running resumes."""
    from ogmge_train.config import resolve
    from ogmge_train.sweep import aggregate, parse_seeds, sweep

    from avprep.errors import ConfigError

    seed_list = parse_seeds(seeds)
    cfg = resolve(preset, **explicit)
    if not cfg.shards:
        raise ConfigError("--shards is required (the folder or URL written by `avprep extract`)")

    def on_run(i, n, seed, folder):
        err_console.print(f"[bold]seed {seed}[/] ({i + 1}/{n}) → {folder}")

    with _TrainProgress() as progress:
        sweep(cfg, seed_list, on_event=progress, on_run=on_run)
    row = aggregate(cfg.out)
    if as_json:
        print_json(row)
    else:
        console.print(_summary_table(f"{cfg.out}: mean ± std over seeds {seeds}", [row]))


# every train option except those a sweep sets itself
sweep_cmd.params.extend(p for p in train_cmd.params if p.name not in _NOT_SWEPT)

# Imported before cli.train_cli, this module made train_cli register its commands while it was
# still half-initialised (so it found none): register them now.
for _cmd in (probe_cmd, report_cmd, sweep_cmd):
    if _cmd.name not in train_cli.main.commands:
        train_cli.main.add_command(_cmd)
