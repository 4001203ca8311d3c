"""`make demo` = ``python -m cli.demo --out demo-out``; `make compare` adds ``--compare``.

synthesize a CREMA-D-layout dataset → the demo's split files → ``avprep extract`` → ``avprep
verify`` → ``ogmge-train sweep`` per arm and seed → ``ogmge-train probe`` → ``OUT/report.md``
with the table, plots, the precondition and a verdict generated from the numbers. Every step is
the real CLI command (printed, so it can be rerun by hand), called in this process. Settings:
``ogmge_train.demo.DEMO`` (``COMPARE`` with ``--compare``); options here override a few.

Re-running resumes and says what it kept: the finished raw dataset, the extracted shards
(``avprep extract`` keeps finished shards), every finished seed and every probe newer than its
checkpoint. ``--update-readme README.md`` writes the results block between its markers.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import click

from avprep import shardformat as sf
from ogmge_train import demo as demo_lib
from ogmge_train import report as report_lib
from ogmge_train import runfolder

from ._train_ui import summary_table
from ._ui import EXIT_INTERRUPTED, RESUME_HINT, console, err_console, fail, handle_errors, outer_command

_SYNTH_MARKER = ".demo-synth.json"


def _run(step: str, prog: str, args: list[str], note: str = "") -> None:
    """Run ``prog args`` (a click CLI of this package) in-process; stop the demo if it fails."""
    from . import avprep_cli, train_cli

    main = {"avprep": avprep_cli.main, "ogmge-train": train_cli.main}[prog]
    err_console.rule(f"[bold]{step}")
    if note:
        err_console.print(note)
    err_console.print(f"$ {prog} {shlex.join(args)}", style="dim")
    try:
        with outer_command(RESUME_HINT):        # Ctrl-C names the demo's command, not this step's
            rc = main.main(args, prog_name=prog, standalone_mode=False)
    except click.ClickException as e:
        e.show()
        rc = e.exit_code
    except click.exceptions.Exit as e:
        rc = e.exit_code
    if rc == EXIT_INTERRUPTED:      # the step printed the demo's Ctrl-C hint
        raise click.exceptions.Exit(rc)
    if isinstance(rc, int) and rc != 0:
        fail(f"demo stopped: `{prog} {args[0]}` exited with {rc}", rc)


def _flags(settings: dict) -> list[str]:
    """TrainConfig fields as `ogmge-train` options."""
    return [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def _synth(cfg, raw: Path, kept: list[str]) -> None:
    settings = {"clips": cfg.clips, "seed": cfg.synth_seed, "audio_snr": cfg.audio_snr,
                "visual_snr": cfg.visual_snr, "duration": cfg.duration}
    marker = raw / _SYNTH_MARKER
    if marker.is_file():
        if json.loads(marker.read_text()) == settings:
            kept.append(f"raw dataset ({cfg.clips} clips)")
            err_console.rule("[bold]1/7 synthesize the raw dataset")
            err_console.print(f"kept {raw} ({cfg.clips} clips) from an earlier run")
            return
        fail(f"{raw} holds a different synthetic dataset ({marker.read_text().strip()}); choose another "
             f"--out or delete {raw.parent}")
    if raw.exists():
        fail(f"{raw} exists but was not written by the demo; choose another --out")
    partial = raw.with_name(raw.name + ".partial")
    if partial.exists():          # an interrupted synth of ours: clips are cheap, start it over
        shutil.rmtree(partial)
    _run("1/7 synthesize the raw dataset", "avprep", [
        "synth", "--dataset", "cremad", "--out", str(partial), "--clips", str(cfg.clips),
        "--seed", str(cfg.synth_seed), "--audio-snr", str(cfg.audio_snr),
        "--visual-snr", str(cfg.visual_snr), "--duration", str(cfg.duration)])
    runfolder.atomic_write_json(partial / _SYNTH_MARKER, settings)
    partial.rename(raw)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the data, runs and report (re-running resumes in it).")
@click.option("--compare", is_flag=True, help="Every method (`make compare`), not the demo's four arms.")
@click.option("--clips", type=click.IntRange(12), help=f"Synthetic clips [default: {demo_lib.DEMO.clips}].")
@click.option("--epochs", type=click.IntRange(1), help=f"Epochs per run [default: {demo_lib.DEMO.epochs}].")
@click.option("--seeds", help=f"Seeds, e.g. 0-4 [default: {','.join(map(str, demo_lib.DEMO.seeds))}].")
@click.option("--update-readme", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Write the results block between the demo markers of this README.")
@click.option("--note", default="", help="Text added after the wall times in the results block "
              "(e.g. how loaded the machine was).")
@handle_errors(interrupt_hint=RESUME_HINT)
def main(out, compare, clips, epochs, seeds, update_readme, note):
    """Run the OGM-GE demo end to end on this CPU and write OUT/report.md."""
    from ogmge_train.sweep import parse_seeds

    base = demo_lib.COMPARE if compare else demo_lib.DEMO
    cfg = dataclasses.replace(base, **{k: v for k, v in {
        "clips": clips, "epochs": epochs, "seeds": tuple(parse_seeds(seeds)) if seeds else None}.items()
        if v is not None})
    out = Path(out)
    raw, shards, runs, splits = out / "raw", out / "shards", out / "runs", out / "splits"
    seconds, kept, t0 = {}, [], time.monotonic()
    # Stage times of the run that did the work: a resumed run keeps the earlier numbers of the
    # stages it skipped, so the report's wall times describe the whole job.
    times_file = out / "timings.json"
    earlier = runfolder.read_json(times_file) if times_file.is_file() else {}

    def lap(name, did_work=True):
        nonlocal t0
        seconds[name] = time.monotonic() - t0 if did_work or name not in earlier else earlier[name]
        t0 = time.monotonic()

    arms, skipped = [], []
    for arm in cfg.arms:
        problem = demo_lib.arm_problem(arm)
        (skipped if problem else arms).append(problem or arm)
    for problem in skipped:
        err_console.print(f"[yellow]skipped[/] {problem}")
    cfg = dataclasses.replace(cfg, arms=tuple(arms))

    _synth(cfg, raw, kept)
    lap("synth", not kept)
    err_console.rule("[bold]2/7 split files")
    files = demo_lib.write_split_files(raw, splits, cfg)
    n = demo_lib.split_counts(cfg)
    err_console.print(f"{n['train']} train, {n['val']} val, {n['test']} test clips → {splits}")
    had_shards = (shards / sf.DATASET).is_file()
    if had_shards:
        kept.append("extracted shards")
    _run("3/7 extract shards (finished shards are kept)", "avprep", [
        "extract", "--dataset", "cremad", "--src", str(raw), "--out", str(shards),
        "--frame-size", str(cfg.frame_size), *_flags(cfg.spec), "--shard-size", str(cfg.shard_size),
        "--workers", str(cfg.extract_workers), *(x for s in ("train", "val", "test")
                                                 for x in ("--split-file", f"{s}={files[s]}"))])
    lap("extract", not had_shards)
    _run("4/7 verify shards", "avprep", ["verify", str(shards)])
    lap("verify")

    jobs = [(arm, seed) for arm in cfg.arms for seed in cfg.seeds]
    done_before = [j for j in jobs if runfolder.finished(runfolder.seed_dir(runs / j[0].name, j[1]), cfg.epochs)]
    if done_before:
        kept.append(f"{len(done_before)} of {len(jobs)} trainings")
    trained, train_time = 0, 0.0
    for i, (arm, seed) in enumerate(jobs):
        if (arm, seed) in done_before:
            continue
        left = sum(1 for j in jobs[i:] if j not in done_before)
        eta = (f"ETA: ~{_duration(train_time / trained * left)} of training left ({left} runs), then probes"
               if trained else f"{left} trainings to go; the ETA follows the first")
        t_run = time.monotonic()
        _run(f"5/7 train {arm.name}, seed {seed} ({i + 1}/{len(jobs)})", "ogmge-train", [
            "sweep", "--seeds", str(seed), "--shards", str(shards), "--out", str(runs / arm.name),
            "--preset", cfg.preset, "--epochs", str(cfg.epochs),
            "--modulation-end", str(demo_lib.modulation_end(cfg)), *_flags(arm.settings), *_flags(cfg.train)],
             note=eta)
        trained += 1
        train_time += time.monotonic() - t_run
    lap("train", trained > 0)

    probed = 0
    for arm in cfg.arms:
        for seed in cfg.seeds:
            run = runfolder.seed_dir(runs / arm.name, seed)
            wanted = [m for m in ("audio", "visual") if arm.settings.get("modality", "both") in ("both", m)]
            best = runfolder.checkpoint_path(run, "best")
            fresh = all(runfolder.probe_path(run, m).is_file() and best.is_file()
                        and runfolder.probe_path(run, m).stat().st_mtime_ns >= best.stat().st_mtime_ns
                        for m in wanted)
            if fresh:
                probed += 1
                continue
            _run(f"6/7 linear probes of {arm.name}, seed {seed}", "ogmge-train", [
                "probe", str(run), "--max-iter", str(cfg.probe_steps)])
    if probed:
        kept.append(f"{probed} probed runs")
    lap("probe", probed < len(cfg.arms) * len(cfg.seeds))

    err_console.rule("[bold]7/7 report")
    folders = [runs / a.name for a in cfg.arms]
    groups = {a.name: [report_lib.read_run(p) for p in runfolder.expand_runs([runs / a.name])
                       if int(runfolder.read_config(p).get("seed", -1)) in cfg.seeds] for a in cfg.arms}
    findings = demo_lib.conclusion(groups, cfg)
    rep = report_lib.write_report(folders, out, title=("Every method" if compare else "OGM-GE demo")
                                  + " (synthetic CREMA-D)", preamble=_preamble(cfg, seconds, skipped),
                                  conclusion=findings)
    extra = _extra_plots(cfg, groups, rep, out, compare)
    lap("report")
    out.mkdir(parents=True, exist_ok=True)
    runfolder.atomic_write_json(times_file, seconds)
    footer = f"Wall time on this machine: {_times(seconds)}." + (f" {note}" if note else "")
    block = demo_lib.readme_block(cfg, report_lib.markdown_table(rep.table), findings, footer=footer)
    runfolder.atomic_write_text(out / "readme-block.md", block)
    if update_readme:
        demo_lib.update_readme(update_readme, block)
        err_console.print(f"updated the results block of {update_readme}")

    console.print(summary_table("results (test %, mean ± std over seeds)", rep.table))
    console.print(findings)
    if kept:
        err_console.print("kept from an earlier run: " + ", ".join(kept))
    err_console.print(f"wrote {rep.markdown}, {', '.join(p.name for p in [*rep.plots.values(), *extra])} "
                      f"in {_duration(sum(seconds.values()))}")


def _times(seconds: dict[str, float]) -> str:
    return ", ".join(f"{k} {_duration(v)}" for k, v in seconds.items())


def _extra_plots(cfg, groups, rep, out: Path, compare: bool) -> list[Path]:
    """The precondition figure, and (compare) Figure-1/3-style plots of each method vs the baseline."""
    paths = [report_lib.plot_seed_bars(
        {f"{cfg.visual_only} (visual model)": report_lib.per_seed(groups.get(cfg.visual_only, []), "acc"),
         f"{cfg.baseline}: its visual branch": report_lib.per_seed(groups.get(cfg.baseline, []), "acc_v"),
         **({f"{cfg.treated}: its visual branch": report_lib.per_seed(groups[cfg.treated], "acc_v")}
            if groups.get(cfg.treated) else {})},
        out / "precondition.png", "precondition: visual test accuracy, visual-only model vs inside concat")]
    if compare:
        by_label = {g.label: g for g in rep.groups}
        base = by_label.get(cfg.baseline)
        for arm in cfg.arms:
            g = by_label.get(arm.name)
            if g is None or base is None or arm.name == cfg.baseline or arm.settings.get("modality", "both") != "both":
                continue
            folder = out / "methods" / arm.name
            paths.append(report_lib.plot_accuracy([base, g], folder / "accuracy.png"))
            paths.append(report_lib.plot_rho([base, g], folder / "rho.png"))
    return paths


def _preamble(cfg, seconds: dict[str, float], skipped: list[str]) -> str:
    common = f"--preset {cfg.preset} --epochs {cfg.epochs} --modulation-end {demo_lib.modulation_end(cfg)}"
    arms = "\n".join(f"- `{a.name}`: `ogmge-train sweep {common} {shlex.join(_flags(a.settings) + _flags(cfg.train))}`"
                     for a in cfg.arms)
    text = (demo_lib.setup_markdown(cfg) + f"\nExtracted with `--frame-size {cfg.frame_size} "
            f"{shlex.join(_flags(cfg.spec))}` from the demo's split files; each arm trained with the same "
            f"budget:\n\n{arms}\n\nWall time: {_times(seconds)}.\n")
    if skipped:
        text += "\nNot run (this build lacks them): " + "; ".join(skipped) + ".\n"
    return text + "\n![precondition](precondition.png)\n"


if __name__ == "__main__":
    sys.exit(main())
