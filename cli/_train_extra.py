"""`ogmge-train probe | report | sweep | reproduce`: front-ends of ogmge_train.probe / report / sweep /
reproduce."""
from __future__ import annotations

import click

from ogmge_train import report as report_lib
from ogmge_train import runfolder
from ogmge_train.errors import ConfigError
from ogmge_train.probe import MODALITIES

from . import _ui
from ._train_ui import TrainProgress, absolute_shards, choice, summary_table, train_options

__all__ = ["probe_cmd", "report_cmd", "reproduce_cmd", "sweep_cmd"]


# ----------------------------------------------------------------------------- probe

@click.command("probe")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--modality", type=click.Choice(MODALITIES), multiple=True, show_default="every encoder the run has",
              help="Encoder(s) to probe (repeatable).")
@click.option("--split", default="test", show_default=True, help="Split the probe is scored on.")
@click.option("--which", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="Checkpoint whose encoders are probed.")
@click.option("--max-iter", "steps", type=click.IntRange(1), default=100, show_default=True,
              help="Full-batch L-BFGS iterations of the linear fit.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True,
              help="Batch size of feature extraction.")
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True, help="Data loader processes.")
@click.option("--device", type=choice("device"), default="auto", show_default=True,
              help="Device of feature extraction and fit.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@_ui.handle_errors
def probe_cmd(runs, modality, split, which, steps, batch_size, workers, device, as_json):
    """Fit a linear classifier on the frozen encoder features of each RUN (or sweep folder).

    Writes RUN/probe_<modality>.json; `ogmge-train report` shows it."""
    from ogmge_train.probe import probe
    from ogmge_train.train import select_device

    device = str(select_device(device))
    results = []
    for run in report_lib.expand_runs(runs):
        config = report_lib.read_run(run).config
        have = [m for m in MODALITIES if config.get("modality", "both") in ("both", m)]
        for m in modality or have:
            if m not in have:
                raise ConfigError(f"{run}: trained with modality={config.get('modality')!r}, it has no {m} encoder")
            results.append((run, _probe_one(probe, run, m, split=split, which=which, steps=steps,
                                            batch_size=batch_size, workers=workers, device=device)))
    if as_json:
        _ui.print_json({f"{run}:{r.modality}": r.results for run, r in results})
        return
    rows = [[str(run), r.modality, r.results["l2"],
             *(f"{100 * r.results[s]['acc']:.1f}" if s in r.results else "—" for s in ("train", "val", split))]
            for run, r in results]
    _ui.console.print(_ui.table("linear probe accuracy (%)", ["run", "encoder", "L2", "train", "val", split], rows,
                                numeric={2, 3, 4, 5}))


def _probe_one(probe, run, modality, **kw):
    with _ui.make_progress("samples") as progress:
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
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for report.md and the PNGs.")
@click.option("--title", default="Training runs", show_default=True, help="Title of report.md.")
@click.option("--split", default="test", show_default=True, help="Split of the accuracy plot.")
@_ui.handle_errors
def report_cmd(runs, out, title, split):
    """Compare RUNs (run folders or sweep folders): markdown table + accuracy / rho / loss plots.

    Runs whose configurations differ only in the seed are one row (mean ± std)."""
    rep = report_lib.write_report(runs, out, title=title, split=split)
    _ui.console.print(summary_table(title, rep.table))
    _ui.err_console.print(f"wrote {rep.markdown} and {', '.join(p.name for p in rep.plots.values())}")


# ----------------------------------------------------------------------------- sweep

SWEEP_INTERRUPTED = ("interrupted; finished seeds are kept: `{command}` skips them and resumes the interrupted "
                     "seed from its last finished epoch")


@click.command("sweep")
@click.option("--seeds", required=True, help="Seeds to run, e.g. 0,1,2 or 0-4.")
@train_options(exclude=("--seed",), overrides={
    "--shards": dict(required=True),
    "--out": dict(required=True, help="Sweep folder to create (or resume): one seed-<k> run folder per seed.")})
@click.option("--json", "as_json", is_flag=True, help="Print the mean ± std row as JSON on stdout.")
@_ui.handle_errors(interrupt_hint=SWEEP_INTERRUPTED)
def sweep_cmd(seeds, as_json, preset, **explicit):
    """Train one configuration once per seed into OUT/seed-<k>, then show mean ± std.

    Takes every option of `train` but --seed. Finished seeds are skipped, so re-running resumes."""
    from ogmge_train.config import resolve
    from ogmge_train.sweep import aggregate, parse_seeds, sweep

    seed_list = parse_seeds(seeds)
    explicit["shards"] = absolute_shards(explicit["shards"])
    cfg = resolve(preset, **explicit)

    def on_run(i, n, seed, folder):
        left = sum(not runfolder.finished(runfolder.seed_dir(cfg.out, k), cfg.epochs) for k in seed_list[i:])
        _ui.err_console.print(f"[bold]seed {seed}[/] ({i + 1}/{n}) → {folder}{progress.runs_eta(left)}")

    with TrainProgress() as progress:
        sweep(cfg, seed_list, on_event=progress, on_run=on_run)
    row = aggregate(cfg.out)
    if as_json:
        _ui.print_json(row)
    else:
        _ui.console.print(summary_table(f"{cfg.out}: mean ± std over seeds {seeds}", [row]))


# ----------------------------------------------------------------------------- reproduce

# Each row of a table fixes these; the other training options apply to every row (reproduce refuses
# an option a row of the chosen table sets, e.g. --optimizer for Table 6).
_ROW_OPTIONS = ("--seed", "--out", "--fusion", "--modulation", "--drop-modality", "--modality", "--model", "--task",
                "--audio-arch")


@click.command("reproduce")
@click.option("--table", type=click.Choice([str(t) for t in range(1, 8)]), show_default="required unless --list",
              help="The OGM-GE paper's table: 1 (fusion heads with and without OGM-GE, and unimodal), 2 "
                   "(concat vs Modality-Drop audio/visual, Gradient-Blending, OGM, OGM-GE), 6 (SGD vs Adam, "
                   "with and without OGM-GE), 3 (TSN-AV, TSM-AV, TBN, PSP with and without OGM-GE), 4 (x-vector "
                   "with and without OGM-GE), 5 (AVE localisation: AVGA, PSP with and without OGM-GE), 7 (batch "
                   "size x lr, and GE alone).")
@click.option("--list", "show_list", is_flag=True,
              help="Print every table, row and dataset with the paper's value and whether this build runs it.")
@click.option("--out", type=click.Path(file_okay=False), show_default="required unless --list",
              help="Folder of the table: runs/<row>/seed-<k>, report.md, reproduce.json.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Seeds of every row, e.g. 0,1,2 or 0-4.")
@click.option("--missing", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
              help="Rows this build cannot run: skip them (listed in the report) or refuse before training.")
@train_options(exclude=_ROW_OPTIONS, overrides={"--shards": dict(show_default="required unless --list")})
@_ui.handle_errors(interrupt_hint=SWEEP_INTERRUPTED)
def reproduce_cmd(table, show_list, out, seeds, missing, preset, **explicit):
    """Run a paper table's rows x seeds with the paper's settings; report ours next to the paper's.

    The preset is the dataset's paper preset unless --preset is given; other options (e.g.
    --epochs for a trial, --select-on test for the reference code's protocol) apply to every row.
    Finished seeds are kept (and named), so re-running resumes."""
    from ogmge_train.reproduce import reproduce
    from ogmge_train.sweep import parse_seeds

    if show_list:
        _print_listing()
        return
    if table is None or not out:
        raise ConfigError("--table and --out are required (or --list to see the tables)")
    if not explicit.get("shards"):
        raise ConfigError("--shards is required (the folder or URL written by `avprep extract`)")
    overrides = {k: v for k, v in explicit.items() if v is not None and k != "shards"}

    def on_event(e: dict) -> None:
        if e["event"] == "skip":
            _ui.warn(f"row {e['row']} skipped: {e['reason']}")
        elif e["event"] == "run":
            what = (": kept (finished by an earlier run)" if e["kept"]
                    else progress.runs_eta(e["total"] - e["index"]))
            _ui.err_console.print(f"[bold]{e['row']}[/], seed {e['seed']} ({e['index'] + 1}/{e['total']}){what}")
        else:
            progress(e)

    with TrainProgress() as progress:
        result = reproduce(int(table), absolute_shards(explicit["shards"]), out, seeds=parse_seeds(seeds),
                           overrides=overrides, on_event=on_event, preset=preset, missing=missing)
    if result.kept:
        _ui.err_console.print(f"kept {len(result.kept)} finished row/seed run(s): "
                              + ", ".join(f"{r} seed {s}" for r, s in result.kept))
    _ui.err_console.print(f"wrote {result.report} and {result.numbers}")


def _print_listing() -> None:
    """One table per paper table: its rows with the paper's values per dataset column."""
    from ogmge_train.reproduce import listing

    for t in listing():
        where = "reproduce runs it" if t["reason"] is None else f"not runnable yet: {t['reason']}"
        rows = [[r["name"], r["label"], *(f"{v:.1f}" for v in r["values"].values()),
                 "yes" if r["reason"] is None else "no"] for r in t["rows"]]
        _ui.console.print(f"[bold]Table {t['table']}[/]: {t['title']}; {where}", soft_wrap=True)
        _ui.console.print(_ui.table(None, ["row", "paper's row", *t["columns"], "runs here"], rows,
                                    numeric=set(range(2, 2 + len(t["columns"])))))
        if t["reason"] is None:     # rows of a runnable table that are not built, each reason once
            for why in dict.fromkeys(r["reason"] for r in t["rows"] if r["reason"] is not None):
                names = ", ".join(r["name"] for r in t["rows"] if r["reason"] == why)
                _ui.console.print(f"  not built: {names}: {why}", soft_wrap=True)
