"""`make demo` = ``python -m cli.demo --out demo-out``; `make demo-quick` adds ``--quick``, `make
compare` ``--compare``.

synthesize a CREMA-D-layout dataset → the demo's split files → ``avprep extract`` → ``avprep
verify`` → per arm ``ogmge-train sweep`` over the seeds, then ``ogmge-train probe --which last``
→ ``OUT/report.md`` with the design, the pre-registered protocol, the table, plots, the
precondition and the statistics generated from the numbers. Every step is the real CLI command
(printed, so it can be rerun by hand). Data steps run in this process; the trainings run as
``jobs`` processes side by side with one torch thread each (on small CPU models two single-thread
processes do about twice the work of one two-thread process), each arm's output in
``OUT/logs/<arm>.log``. Settings: ``ogmge_train.demo.DEMO`` (``QUICK``, ``COMPARE``); options here
override a few.

Re-running resumes and says what it kept: the finished raw dataset, the extracted shards
(``avprep extract`` keeps finished shards), every finished seed and every probe of the last
checkpoint. ``--update-readme README.md`` writes the results block between its markers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
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
_POLL_S = 0.5


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
                "visual_snr": cfg.visual_snr, "audio_cue_fraction": cfg.audio_cue_fraction,
                "classes": cfg.num_classes, "duration": cfg.duration, "fps": cfg.synth_fps, "size": cfg.synth_size}
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
        "--visual-snr", str(cfg.visual_snr), "--audio-cue-fraction", str(cfg.audio_cue_fraction),
        "--classes", str(cfg.num_classes), "--duration", str(cfg.duration), "--fps", str(cfg.synth_fps),
        "--size", cfg.synth_size])
    runfolder.atomic_write_json(partial / _SYNTH_MARKER, settings)
    partial.rename(raw)


# ----------------------------------------------------------------------------- trainings

@dataclasses.dataclass
class _Job:
    """One arm: its sweep over the seeds, then the probes of its last checkpoints."""

    arm: demo_lib.Arm
    commands: list[list[str]]     # ogmge-train argument lists, run in order
    runs: int                     # seed runs this job still trains
    cost: float                   # relative CPU cost (a two-encoder run is ~2 single-encoder ones)
    log: Path
    proc: subprocess.Popen | None = None
    after: set = dataclasses.field(default_factory=set)   # arms that must finish first (teachers)
    step: str = ""                # the subcommand running now
    started: float = 0.0


def _probe_fresh(run: Path, wanted: list[str]) -> bool:
    """Every wanted probe exists, is of last.pt, and is newer than last.pt."""
    last = runfolder.checkpoint_path(run, "last")
    if not last.is_file():
        return False
    for m in wanted:
        probe = runfolder.read_probe(run, m)
        path = runfolder.probe_path(run, m)
        if probe is None or probe.get("which") != "last" or path.stat().st_mtime_ns < last.stat().st_mtime_ns:
            return False
    return True


def _modalities(arm) -> list[str]:
    return [m for m in ("audio", "visual") if arm.settings.get("modality", "both") in ("both", m)]


def _changed_runs(cfg, arm, folder: Path, shards: Path) -> list[str]:
    """The seeds of ``arm`` under ``folder`` whose config.json differs from what the demo would
    train now, as one phrase each (e.g. ``seed-0: lr 0.01 → 0.03``)."""
    import dataclasses as dc

    from ogmge_train.config import resolve

    out = []
    for s in demo_lib.arm_seeds(cfg, arm):
        run = runfolder.seed_dir(folder, s)
        if not runfolder.is_run(run):
            continue
        wanted = dc.asdict(resolve(cfg.preset, shards=str(shards), out=str(run), seed=s,
                                   **demo_lib.arm_settings(cfg, arm, folder.parent.resolve(), s)))
        changes = demo_lib.setting_changes(runfolder.read_config(run), wanted)
        if changes:
            out.append(f"{run.name}: " + ", ".join(f"{k} {a} → {b}" for k, (a, b) in list(changes.items())[:3]))
    return out


def _plan_jobs(cfg, shards: Path, runs: Path, logs: Path) -> tuple[list[_Job], list[str], int, int]:
    """The jobs still to do, what was kept (one phrase per arm with finished runs of the same
    settings), probed runs kept, and all runs. Stops, changing nothing, when a run of an earlier
    demo has other settings than this one would use."""
    changed = {arm.name: c for arm in cfg.arms if (c := _changed_runs(cfg, arm, runs / arm.name, shards))}
    if changed:
        name, what = next(iter(changed.items()))
        fail(f"{runs / name} holds runs trained with other settings ({what[0]}"
             + (f"; {len(changed) - 1} more arm(s) too" if len(changed) > 1 else "")
             + "); delete those arm folders or choose another --out")
    jobs, kept, probed, total = [], [], 0, 0
    for arm in cfg.arms:
        folder = runs / arm.name
        seeds = demo_lib.arm_seeds(cfg, arm)
        total += len(seeds)
        todo = [s for s in seeds if not runfolder.finished(runfolder.seed_dir(folder, s), cfg.epochs)]
        done = [s for s in seeds if s not in todo]
        if done:
            kept.append(f"{arm.name} seed{'s' if len(done) > 1 else ''} {demo_lib._seed_list(done)}")
        # the probes are secondary endpoints of the multimodal contrasts: unimodal arms need none
        fresh = [s for s in done if not arm.multimodal
                 or _probe_fresh(runfolder.seed_dir(folder, s), _modalities(arm))]
        probed += len(fresh) if arm.multimodal else 0
        commands = []
        # an arm with teachers names another run per seed: one sweep per seed
        for group in ([[s] for s in todo] if arm.teachers else [todo] if todo else []):
            commands.append(["sweep", "--seeds", ",".join(map(str, group)), "--shards", str(shards),
                             "--out", str(folder), "--preset", cfg.preset,
                             *_flags(demo_lib.arm_settings(cfg, arm, runs.resolve(), group[0]))])
        stale = [s for s in seeds if s not in fresh] if arm.multimodal else []
        if stale:
            commands.append(["probe", *(str(runfolder.seed_dir(folder, s)) for s in stale), "--which", "last",
                             "--max-iter", str(cfg.probe_steps)])
        if commands:
            cost = (2.0 if arm.multimodal else 1.0) * (len(todo) + 0.3 * len(stale))
            jobs.append(_Job(arm, commands, len(todo), cost, logs / f"{arm.name}.log",
                             after={t for _, t in arm.teachers}))
    # longest first, so the lanes end together
    jobs.sort(key=lambda j: -j.cost)
    return jobs, kept, probed, total


def _total_runs(cfg) -> int:
    return sum(len(demo_lib.arm_seeds(cfg, a)) for a in cfg.arms)


def _finished_runs(cfg, runs: Path) -> int:
    return sum(runfolder.finished(runfolder.seed_dir(runs / a.name, s), cfg.epochs)
               for a in cfg.arms for s in demo_lib.arm_seeds(cfg, a))


def _start(job: _Job, threads: int) -> None:
    args = job.commands.pop(0)
    job.step = args[0]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    err_console.print(f"$ ogmge-train {shlex.join(args)}   [dim]→ {job.log}[/]", soft_wrap=True)
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with job.log.open("a") as log:
        log.write(f"$ ogmge-train {shlex.join(args)}\n")
        log.flush()
        job.proc = subprocess.Popen([sys.executable, "-m", "cli.train_cli", *args], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    job.started = time.monotonic()


def _stop_all(running: list[_Job]) -> None:
    for job in running:
        if job.proc is not None and job.proc.poll() is None:
            job.proc.terminate()
    for job in running:
        if job.proc is not None:
            try:
                job.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                job.proc.kill()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _train_all(cfg, jobs: list[_Job], runs: Path, lanes: int, threads: int) -> None:
    """Run the jobs ``lanes`` at a time; print progress with an ETA as runs finish."""
    total = _total_runs(cfg)
    todo_cost = sum(j.cost for j in jobs)
    queue, running = list(jobs), []
    done_before = _finished_runs(cfg, runs)
    seen, t0 = done_before, time.monotonic()
    err_console.print(f"{sum(j.runs for j in jobs)} trainings to go in {len(jobs)} jobs, {lanes} at a time "
                      f"({threads} torch thread{'s' if threads > 1 else ''} each); the ETA follows the first")
    try:
        while queue or running:
            while len(running) < lanes:
                busy = {j.arm.name for j in (*queue, *running)}
                ready = [j for j in queue if not j.after & busy]
                if not ready:
                    break
                job = ready[0]
                queue.remove(job)
                err_console.rule(f"[bold]5/7 train and probe {job.arm.name}")
                _start(job, threads)
                running.append(job)
            time.sleep(_POLL_S)
            for job in list(running):
                assert job.proc is not None
                rc = job.proc.poll()
                if rc is None:
                    continue
                if rc != 0:
                    _stop_all(running)
                    err_console.print(_tail(job.log), markup=False, highlight=False)
                    fail(f"demo stopped: `ogmge-train {job.step}` for {job.arm.name} exited with {rc} "
                         f"(log: {job.log}); run the demo again to resume", rc)
                if job.commands:
                    _start(job, threads)
                else:
                    running.remove(job)
                    err_console.print(f"[green]done[/] {job.arm.name}")
            now = _finished_runs(cfg, runs)
            if now != seen:
                seen = now
                done_cost = todo_cost - sum(j.cost for j in queue) - sum(
                    j.cost * (1 - _job_progress(cfg, runs, j)) for j in running)
                left = (time.monotonic() - t0) / max(done_cost, 1e-9) * (todo_cost - done_cost)
                err_console.print(f"trained {now}/{total} runs; ETA ~{_duration(left)} (training and probes)")
    except KeyboardInterrupt:
        _stop_all(running)
        raise


def _job_progress(cfg, runs: Path, job: _Job) -> float:
    """Share of a running job's trainings done, its current one counted as half done (so the
    first ETA, when one lane has finished a run and the other is halfway, is not twice too long)."""
    if not job.runs:
        return 0.0
    seeds = demo_lib.arm_seeds(cfg, job.arm)
    done = sum(runfolder.finished(runfolder.seed_dir(runs / job.arm.name, s), cfg.epochs) for s in seeds)
    done -= len(seeds) - job.runs
    return min(1.0, (done + (0.5 if done < job.runs else 0.0)) / job.runs)


# ----------------------------------------------------------------------------- the command

@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the data, runs and report (re-running resumes in it).")
@click.option("--compare", is_flag=True, help="Every method (`make compare`), not the demo's arms.")
@click.option("--quick", is_flag=True, help="`make demo-quick`: 512 test clips, 3 seeds, the four core arms.")
@click.option("--clips", type=click.IntRange(12), help=f"Synthetic clips [default: {demo_lib.DEMO.clips}].")
@click.option("--epochs", type=click.IntRange(1), help=f"Epochs per run [default: {demo_lib.DEMO.epochs}].")
@click.option("--seeds", help=f"Seeds, e.g. 0-4 [default: {demo_lib._seed_list(demo_lib.DEMO.seeds)}].")
@click.option("--jobs", type=click.IntRange(1), help=f"Trainings side by side [default: {demo_lib.DEMO.jobs}, "
              "at most the CPU count].")
@click.option("--update-readme", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Write the results block between the demo markers of this README.")
@click.option("--note", default="", help="Text added after the wall times in the results block "
              "(e.g. how loaded the machine was).")
@handle_errors(interrupt_hint=RESUME_HINT)
def main(out, compare, quick, clips, epochs, seeds, jobs, update_readme, note):
    """Run the OGM-GE demo end to end on this CPU and write OUT/report.md."""
    cfg = _settings(compare, quick, clips=clips, epochs=epochs, seeds=seeds, jobs=jobs)
    lanes = max(1, min(cfg.jobs, os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // lanes)
    out = Path(out)
    clock, kept = _Clock(out / "timings.json"), []
    arms, skipped = [], []
    for arm in cfg.arms:
        problem = demo_lib.arm_problem(arm)
        (skipped if problem else arms).append(problem or arm)
    for problem in skipped:
        err_console.print(f"[yellow]skipped[/] {problem}")
    cfg = dataclasses.replace(cfg, arms=tuple(arms))

    shards = _prepare_data(cfg, out, clock, kept)
    _train_stage(cfg, shards, out / "runs", out / "logs", clock, kept, lanes, threads)
    _report_stage(cfg, out, clock, kept, skipped, lanes, compare=compare, note=note, update_readme=update_readme)


def _settings(compare: bool, quick: bool, **given) -> demo_lib.DemoConfig:
    """The preset the flags pick, with the options given on the command line over it."""
    from ogmge_train.sweep import parse_seeds

    if compare and quick:
        raise click.UsageError("--compare and --quick exclude each other")
    base = demo_lib.COMPARE if compare else demo_lib.QUICK if quick else demo_lib.DEMO
    if given.get("seeds"):
        given["seeds"] = tuple(parse_seeds(given["seeds"]))
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


class _Clock:
    """Wall time per stage. A stage a rerun skipped keeps the time of the run that did its work
    (``timings.json``), so the report's wall times describe the whole job."""

    def __init__(self, path: Path):
        self.path = path
        self.earlier = runfolder.read_json(path) if path.is_file() else {}
        self.seconds: dict[str, float] = {}
        self.t0 = time.monotonic()

    def lap(self, name: str, did_work: bool = True) -> None:
        self.seconds[name] = (time.monotonic() - self.t0 if did_work or name not in self.earlier
                              else self.earlier[name])
        self.t0 = time.monotonic()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        runfolder.atomic_write_json(self.path, self.seconds)


def _prepare_data(cfg, out: Path, clock: _Clock, kept: list[str]) -> Path:
    """Steps 1-4: synthesize, split, extract, verify (each kept when an earlier run finished it)."""
    raw, shards, splits = out / "raw", out / "shards", out / "splits"
    _synth(cfg, raw, kept)
    clock.lap("synth", not kept)
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
    clock.lap("extract", not had_shards)
    _run("4/7 verify shards", "avprep", ["verify", str(shards)])
    clock.lap("verify")
    return shards


def _train_stage(cfg, shards: Path, runs: Path, logs: Path, clock: _Clock, kept: list[str], lanes: int,
                 threads: int) -> None:
    """Steps 5-6: every training and probe not already finished with the same settings."""
    jobs_, kept_runs, probed, total = _plan_jobs(cfg, shards.resolve(), runs, logs)
    done_before = _finished_runs(cfg, runs)
    if done_before:
        kept.append(f"{done_before} of {total} trainings")
        err_console.print("kept finished runs with the same settings: " + "; ".join(kept_runs))
    if probed:
        kept.append(f"{probed} probed runs")
    if jobs_:
        _train_all(cfg, jobs_, runs, lanes, threads)
    else:
        err_console.rule("[bold]5/7 train and 6/7 probe")
        err_console.print("every training and probe was kept")
    clock.lap("train and probe", bool(jobs_))


def _report_stage(cfg, out: Path, clock: _Clock, kept: list[str], skipped: list[str], lanes: int, *,
                  compare: bool, note: str, update_readme: str | None) -> None:
    """Step 7: report.md and its plots, the README block, the summary on the terminal."""
    err_console.rule("[bold]7/7 report")
    runs = out / "runs"
    folders = [runs / a.name for a in cfg.arms]
    groups = {a.name: [report_lib.read_run(p) for p in runfolder.expand_runs([runs / a.name])
                       if int(runfolder.read_config(p).get("seed", -1)) in demo_lib.arm_seeds(cfg, a)]
              for a in cfg.arms}
    findings = demo_lib.conclusion(groups, cfg)
    title = {"make compare": "Every method", "make demo-quick": "OGM-GE demo, quick preview"}.get(cfg.label,
                                                                                                 "OGM-GE demo")
    rep = report_lib.write_report(folders, out, title=f"{title} (synthetic CREMA-D)", split="train", at="last",
                                  preamble=_preamble(cfg, clock.seconds, skipped, lanes), conclusion=findings)
    extra = _extra_plots(cfg, groups, rep, out, compare)
    clock.lap("report")
    clock.save()
    footer = (f"Wall time on this machine ({cfg.label}, {lanes} trainings side by side): {_times(clock.seconds)}."
              + (f" {note}" if note else ""))
    block = demo_lib.readme_block(cfg, report_lib.markdown_table(rep.table, "last"), findings, footer=footer)
    runfolder.atomic_write_text(out / "readme-block.md", block)
    if update_readme:
        demo_lib.update_readme(update_readme, block, cfg)
        err_console.print(f"updated the results block of {update_readme}")

    console.print(summary_table("results (test %, last epoch, mean ± std over seeds)", rep.table, at="last"))
    console.print(findings)
    if kept:
        err_console.print("kept from an earlier run: " + ", ".join(kept))
    err_console.print(f"wrote {rep.markdown}, {', '.join(p.name for p in [*rep.plots.values(), *extra])} "
                      f"in {_duration(sum(clock.seconds.values()))}")


def _times(seconds: dict[str, float]) -> str:
    return ", ".join(f"{k} {_duration(v)}" for k, v in seconds.items())


def _extra_plots(cfg, groups, rep, out: Path, compare: bool) -> list[Path]:
    """The precondition figure, the primary contrasts, the mechanism and (compare) Figure-1/3-style
    plots of each method vs the baseline."""
    def branch(arm):
        return report_lib.per_seed(groups.get(arm, []), "acc_v", at="last")

    series = {f"{cfg.visual_only} (visual model)": report_lib.per_seed(groups.get(cfg.visual_only, []), "acc",
                                                                       at="last"),
              f"{cfg.baseline}: its visual branch": branch(cfg.baseline)}
    if groups.get(cfg.treated):
        series[f"{cfg.treated}: its visual branch"] = branch(cfg.treated)
    paths = [report_lib.plot_seed_bars(
        series, out / "precondition.png", "precondition: visual test accuracy at the last epoch, visual-only "
        "model vs the visual branch inside concat")]
    res = demo_lib.analyse(groups, cfg)
    paths.append(report_lib.plot_contrasts(
        {label: res["primary"][label] for label in res["order"]}, out / "effects.png",
        "primary endpoint: fused test accuracy at the last epoch, paired differences by seed"))
    mech = demo_lib.mechanism(groups, cfg)
    paths.append(report_lib.plot_mechanism(mech["curves"], out / "mechanism.png", window=mech["window"],
                                           whole_run={a.name for a in cfg.arms if a.whole_run}))
    if compare:
        by_label = {g.label: g for g in rep.groups}
        base = by_label.get(cfg.baseline)
        for arm in cfg.arms:
            g = by_label.get(arm.name)
            if g is None or base is None or arm.name == cfg.baseline or not arm.multimodal:
                continue
            folder = out / "methods" / arm.name
            paths.append(report_lib.plot_accuracy([base, g], folder / "accuracy.png", "train"))
            paths.append(report_lib.plot_rho([base, g], folder / "rho.png"))
    return paths


def _preamble(cfg, seconds: dict[str, float], skipped: list[str], lanes: int) -> str:
    arms = "\n".join(f"- `{a.name}`: `ogmge-train sweep --preset {cfg.preset} "
                     f"{shlex.join(_flags(demo_lib.arm_settings(cfg, a)))}`"
                     + "".join(f" `--{opt.replace('_', '-')} runs/{t}/seed-<k>`" for opt, t in a.teachers)
                     for a in cfg.arms)
    text = (demo_lib.setup_markdown(cfg) + "\n" + demo_lib.design_markdown(cfg) + "\n"
            + demo_lib.protocol_markdown(cfg) + "\n### Runs\n\n"
            f"Extracted with `--frame-size {cfg.frame_size} {shlex.join(_flags(cfg.spec))}` from the demo's split "
            f"files; each arm trained with the same budget, seeds {demo_lib.seeds_text(cfg)}; the two-modality "
            f"arms' encoders probed from last.pt (`ogmge-train probe --which last`):\n\n{arms}\n\n"
            f"Wall time ({lanes} trainings side by side): {_times(seconds)}.\n")
    if skipped:
        text += "\nNot run (this build lacks them): " + "; ".join(skipped) + ".\n"
    return text + "\n![precondition](precondition.png) ![effects](effects.png) ![mechanism](mechanism.png)\n"


if __name__ == "__main__":
    sys.exit(main())
