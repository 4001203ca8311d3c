"""`make demo` = ``python -m cli.demo --out demo-out``: the whole job, end to end, on a CPU.

synthesize a CREMA-D-layout dataset → ``avprep extract`` → ``avprep verify`` → ``ogmge-train
sweep`` for each arm (audio-only, visual-only, concat, concat + OGM-GE) over the seeds →
``ogmge-train probe`` → ``OUT/report.md`` with the table, plots and a verdict generated from
the numbers. Every step is the real CLI command (printed, so it can be rerun by hand), called
in this process. The settings are ``ogmge_train.demo.DEMO``; options here override a few.
Re-running resumes: extraction and finished seeds are kept.
"""
from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from pathlib import Path

import click

from ogmge_train.demo import DEMO, conclusion, modulation_end
from ogmge_train.report import expand_runs, read_run, write_report

from ._ui import console, err_console, fail, handle_errors


def _run(step: str, prog: str, args: list[str]) -> None:
    """Run ``prog args`` (a click CLI of this package) in-process; stop the demo if it fails."""
    from . import avprep_cli, train_cli

    main = {"avprep": avprep_cli.main, "ogmge-train": train_cli.main}[prog]
    err_console.rule(f"[bold]{step}")
    err_console.print(f"$ {prog} {shlex.join(args)}", style="dim")
    try:
        rc = main.main(args, prog_name=prog, standalone_mode=False)
    except click.ClickException as e:
        e.show()
        rc = e.exit_code
    if isinstance(rc, int) and rc != 0:
        fail(f"demo stopped: `{prog} {args[0]}` exited with {rc}", rc)


def _preamble(cfg, seconds: dict[str, float]) -> str:
    common = f"--preset {cfg.preset} --epochs {cfg.epochs} --modulation-end {modulation_end(cfg)}"
    arms = "\n".join(f"- `{a.name}`: `ogmge-train sweep {common} {shlex.join(a.options + cfg.train_args)}`"
                     for a in cfg.arms)
    times = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    return (f"Synthetic CREMA-D layout ({cfg.clips} clips, 6 classes): audio cue at {cfg.audio_snr:g} dB SNR "
            f"(a class tone), visual cue at {cfg.visual_snr:g} dB (a class colour under pixel noise). "
            f"Extracted with `--frame-size {cfg.frame_size} {' '.join(cfg.spec_args)}`; each arm trained "
            f"with the same budget on seeds {', '.join(map(str, cfg.seeds))}:\n\n{arms}\n\n"
            f"Wall time: {times}.\n")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--clips", type=click.IntRange(12), help=f"Synthetic clips [default: {DEMO.clips}].")
@click.option("--epochs", type=click.IntRange(1), help=f"Epochs per run [default: {DEMO.epochs}].")
@click.option("--seeds", help=f"Seeds, e.g. 0,1,2 [default: {','.join(map(str, DEMO.seeds))}].")
@handle_errors
def main(out, clips, epochs, seeds):
    """Run the OGM-GE demo end to end on this CPU and write OUT/report.md."""
    from ogmge_train.sweep import parse_seeds

    cfg = dataclasses.replace(DEMO, **{k: v for k, v in {
        "clips": clips, "epochs": epochs, "seeds": tuple(parse_seeds(seeds)) if seeds else None}.items()
        if v is not None})
    out = Path(out)
    raw, shards, runs = out / "raw", out / "shards", out / "runs"
    seed_list = ",".join(map(str, cfg.seeds))
    seconds, t0 = {}, time.monotonic()

    def lap(name):
        nonlocal t0
        seconds[name] = time.monotonic() - t0
        t0 = time.monotonic()

    _run("1/6 synthesize the raw dataset", "avprep", [
        "synth", "--dataset", "cremad", "--out", str(raw), "--clips", str(cfg.clips),
        "--seed", str(cfg.synth_seed), "--audio-snr", str(cfg.audio_snr), "--visual-snr", str(cfg.visual_snr)])
    lap("synth")
    _run("2/6 extract shards", "avprep", [
        "extract", "--dataset", "cremad", "--src", str(raw), "--out", str(shards),
        "--frame-size", str(cfg.frame_size), *cfg.spec_args, "--shard-size", str(cfg.shard_size),
        "--workers", str(cfg.extract_workers)])
    lap("extract")
    _run("3/6 verify shards", "avprep", ["verify", str(shards)])
    lap("verify")
    for i, arm in enumerate(cfg.arms):
        _run(f"4/6 train {arm.name} ({i + 1}/{len(cfg.arms)}), seeds {seed_list}", "ogmge-train", [
            "sweep", "--seeds", seed_list, "--shards", str(shards), "--out", str(runs / arm.name),
            "--preset", cfg.preset, "--epochs", str(cfg.epochs), "--modulation-end", str(modulation_end(cfg)),
            *arm.options, *cfg.train_args])
    lap("train")
    for i, arm in enumerate(cfg.arms):
        _run(f"5/6 linear probes of {arm.name} ({i + 1}/{len(cfg.arms)})", "ogmge-train", [
            "probe", str(runs / arm.name), "--max-iter", str(cfg.probe_steps)])
    lap("probe")

    err_console.rule("[bold]6/6 report")
    groups = {a.name: [read_run(p) for p in expand_runs([runs / a.name])] for a in cfg.arms}
    rep = write_report([runs / a.name for a in cfg.arms], out, title="OGM-GE demo (synthetic CREMA-D)",
                       preamble=_preamble(cfg, seconds), conclusion=conclusion(groups, cfg))
    from ._train_extra import _summary_table
    console.print(_summary_table("demo results (test %, mean ± std over seeds)", rep.table))
    console.print(conclusion(groups, cfg).split("\n", 2)[2].strip())
    err_console.print(f"wrote {rep.markdown} and {', '.join(str(p) for p in rep.plots.values())} "
                      f"in {sum(seconds.values()):.0f} s")


if __name__ == "__main__":
    sys.exit(main())
