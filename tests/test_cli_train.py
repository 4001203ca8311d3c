"""`ogmge-train` as a user meets it: typos, help, one-line errors with the right exit code,
progress in logs, the epoch line, evaluate/probe on sweep folders, and the layering the CLI
relies on (the library never imports it; `python -m ogmge_train` runs it)."""
from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cli import _ui
from cli._train_ui import epoch_line
from cli.avprep_cli import main as avprep_main
from cli.train_cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "demo", "--epochs", "1", "--batch-size", "8", "--image-size", "32", "--device", "cpu",
        "--workers", "0"]


def cli(*args, env=None):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, env=env, prog_name="ogmge-train")
    return r.exit_code, r.output


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output, output
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, output
    return errors[0]


@pytest.fixture(scope="module")
def shards(train_shards):
    return train_shards(clips=32, shard_size=8)


@pytest.fixture(scope="module")
def sweep_dir(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "sw"
    code, output = cli("sweep", "--seeds", "0,1", "--shards", shards, "--out", out, *TINY, "--json")
    assert code == 0, output
    return out


# ---------------------------------------------------------------- commands and help

def test_typo_is_caught_with_a_suggestion_and_options_still_mean_train(tmp_path):
    code, output = cli("evalute", tmp_path)
    assert code == 2 and "No such command 'evalute'. Did you mean 'evaluate'?" in output
    code, output = cli("frobnicate")
    assert code == 2 and "No such command 'frobnicate'." in output and "Did you mean" not in output
    code, output = cli("--out", tmp_path / "run", "--device", "cpu")       # no subcommand: train
    assert code == 2 and one_error_line(output) == "error: --shards is required (the folder or URL written " \
                                                   "by `avprep extract`)"
    r = CliRunner().invoke(avprep_main, ["extrct"])
    assert r.exit_code == 2 and "Did you mean 'extract'?" in r.output


def _options(group):
    for name, cmd in group.commands.items():
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name != "help":
                yield name, p


@pytest.mark.parametrize("group", [main, avprep_main], ids=["ogmge-train", "avprep"])
def test_every_option_has_help_and_shows_its_default(group):
    for name, opt in _options(group):
        where = f"{name} {opt.opts[0]}"
        assert opt.help, f"{where}: no help text"
        shown = opt.is_flag or opt.required or isinstance(opt.show_default, str) or \
            (opt.show_default and opt.default is not None)
        assert shown, f"{where}: default not shown"
        assert "SPEC" not in opt.help, where
    for cmd in group.commands.values():
        assert "SPEC" not in (cmd.help or ""), cmd.name


def test_option_names_agree_across_commands():
    params = {name: {p.name: p for p in cmd.params} for name, cmd in main.commands.items()}
    train_device = params["train"]["device"].type.choices
    for name in ("evaluate", "probe", "sweep"):
        assert params[name]["device"].type.choices == train_device, name
    for name, ps in params.items():
        if "as_json" in ps:
            assert ps["as_json"].is_flag, name            # --json always prints, never takes a file
    assert "--max-iter" in params["probe"]["steps"].opts and "--epochs" not in params["probe"]["steps"].opts
    avprep = {name: {p.name: p for p in cmd.params} for name, cmd in avprep_main.commands.items()}
    assert avprep["verify"]["as_json"].is_flag and avprep["verify"]["json_path"].opts == ["--report"]


def test_library_never_imports_the_cli_and_python_m_ogmge_train_runs():
    """Every module of avprep and ogmge_train imports without cli; only the entry point
    ogmge_train/__main__.py (never imported by the library) names it."""
    import ast
    import pkgutil

    import avprep
    import ogmge_train

    modules = [m.name for pkg in (avprep, ogmge_train) for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")
               if not m.name.endswith(".__main__")]
    assert "ogmge_train.train" in modules and "avprep.extract" in modules and len(modules) > 30
    code = (f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}];"
            "bad = [m for m in sys.modules if m == 'cli' or m.startswith('cli.')]; assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env, timeout=120)
    naming = []
    for path in [*(REPO / "avprep").rglob("*.py"), *(REPO / "ogmge_train").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n == "cli" or n.startswith("cli.") for n in names):
                naming.append(path.relative_to(REPO).as_posix())
    assert naming == ["ogmge_train/__main__.py"]
    for argv in (["-m", "ogmge_train"], ["-m", "cli.train_cli"]):
        r = subprocess.run([sys.executable, *argv, "evaluate", "--help"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "sweep folder" in r.stdout, argv


# ---------------------------------------------------------------- one-line errors

def test_probe_and_evaluate_of_a_folder_that_is_no_run(tmp_path):
    (tmp_path / "raw").mkdir()
    expected = 2        # RunFolderError: a usage error
    for command in ("probe", "evaluate", "report"):
        args = [command, tmp_path / "raw"] + (["--out", tmp_path / "rep"] if command == "report" else [])
        code, output = cli(*args)
        assert code == expected, (command, output)
        assert "raw" in one_error_line(output), command


def test_unwritable_out_is_one_line_exit_2(shards):
    if os.access("/sys", os.W_OK) and not Path("/sys/class").is_dir():
        pytest.skip("no sysfs to stand in for a read-only folder")
    code, output = cli("--shards", shards, "--out", "/sys/ogmge-test-run", *TINY)
    assert code == 2, output
    assert "/sys/ogmge-test-run" in one_error_line(output)


def test_disk_full_and_interrupt_messages(shards, tmp_path, monkeypatch):
    import ogmge_train.train as train_mod

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "last.pt.tmp"))

    monkeypatch.setattr(train_mod, "train", full)
    code, output = cli("--shards", shards, "--out", tmp_path / "run", *TINY)
    line = one_error_line(output)
    assert code == 1 and "last.pt.tmp: No space left on device" in line and "re-run" in line

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train", interrupted)
    code, output = cli("--shards", shards, "--out", tmp_path / "run", *TINY)
    assert code == 130 and "--resume" in one_error_line(output)


def test_unexpected_exception_is_one_line_unless_asked(shards, tmp_path, monkeypatch):
    import ogmge_train.train as train_mod

    def bug(*a, **k):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(train_mod, "train", bug)
    code, output = cli("--shards", shards, "--out", tmp_path / "run", *TINY)
    assert code == 1 and "unexpected ZeroDivisionError: division by zero" in one_error_line(output)
    with pytest.raises(ZeroDivisionError):
        cli("--shards", shards, "--out", tmp_path / "run", *TINY, env={"OGMGE_TRACEBACK": "1"})


def test_bad_choices_are_usage_errors(sweep_dir):
    code, output = cli("probe", sweep_dir, "--device", "gpu")
    assert code == 2 and "Invalid value for '--device'" in output


# ---------------------------------------------------------------- sweeps, progress, lines

def test_evaluate_and_probe_accept_a_sweep_folder(sweep_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                  # any directory: config.json holds absolute shards
    code, output = cli("evaluate", sweep_dir, "--split", "test", "--json")
    assert code == 0, output
    doc = json.loads(output)
    assert sorted(Path(k).name for k in doc) == ["seed-0", "seed-1"]
    assert all(0.0 <= m["acc"] <= 1.0 for m in doc.values())
    code, output = cli("evaluate", sweep_dir / "seed-1", "--json")
    assert code == 0 and json.loads(output) == doc[str(sweep_dir / "seed-1")]
    code, output = cli("evaluate", sweep_dir)
    assert code == 0 and "seed-0" in output and "seed-1" in output
    code, output = cli("evaluate", sweep_dir / "seed-0", env={"AVPREP_PROGRESS_INTERVAL": "0"})
    assert code == 0 and f"evaluate {sweep_dir / 'seed-0'} test: 1/1 batches (100%)" in output, output
    code, output = cli("probe", sweep_dir, "--modality", "audio", "--max-iter", "5", "--json")
    assert code == 0, output
    assert sorted(Path(k.rsplit(":", 1)[0]).name for k in json.loads(output)) == ["seed-0", "seed-1"]


def test_training_in_a_log_prints_periodic_step_lines(shards, tmp_path):
    code, output = cli("--shards", shards, "--out", tmp_path / "run", *TINY, "--modality", "audio",
                       env={"AVPREP_PROGRESS_INTERVAL": "0"})
    assert code == 0, output
    steps = [line for line in output.splitlines() if line.startswith("epoch 0: ")]
    assert steps and "1/3 steps (33%)" in steps[0] and "samples/s" in steps[0], output
    assert "acc_v" not in output and "map_v" not in output          # an audio-only run
    epoch = [line for line in output.splitlines() if line.startswith("epoch 0 | ")]
    assert len(epoch) == 1 and "rho" not in epoch[0] and " k_" not in epoch[0], epoch   # unimodal
    # evaluation has its own progress: batches of each split, with an ETA while it runs
    info = json.loads((Path(shards) / "dataset.json").read_text())["splits"]
    for split in ("val", "test"):
        batches = -(-info[split] // 8)
        lines = [line for line in output.splitlines() if line.startswith(f"epoch 0 {split}: ")]
        assert [line.split(" steps")[0] for line in lines] == [
            f"epoch 0 {split}: {i}/{batches}" for i in range(1, batches + 1)], output


def test_sweep_says_the_eta_of_the_seeds_left(shards, tmp_path):
    code, output = cli("sweep", "--seeds", "0-2", "--shards", shards, "--out", tmp_path / "sw", *TINY)
    assert code == 0, output
    seeds = [line for line in output.splitlines() if line.startswith("seed ")]
    assert seeds[0] == f"seed 0 (1/3) → {tmp_path / 'sw' / 'seed-0'}"
    assert re.fullmatch(rf"seed 1 \(2/3\) → {re.escape(str(tmp_path / 'sw' / 'seed-1'))}, ETA 0:00:\d\d for the 2 left",
                        seeds[1]), seeds
    assert seeds[2].endswith(" for the 1 left")
    (tmp_path / "sw" / "seed-1" / "summary.json").unlink()      # seed 1 to redo, 0 and 2 kept: 1 left
    code, output = cli("sweep", "--seeds", "0-2", "--shards", shards, "--out", tmp_path / "sw", *TINY)
    assert [line for line in output.splitlines() if line.startswith("seed ")] == [
        f"seed {k} ({k + 1}/3) → {tmp_path / 'sw' / f'seed-{k}'}" for k in range(3)]


def test_gradient_blending_estimate_shows_progress_with_an_eta(shards, tmp_path):
    """The OGR weight estimate (copies of the model trained before epoch 0) reports its progress; its
    copies train for the epochs the run has (1 here), not --gb-super-epoch (10)."""
    code, output = cli("--shards", shards, "--out", tmp_path / "run", *TINY, "--modulation", "gradient-blending",
                       "--gb-super-epoch", "10", env={"AVPREP_PROGRESS_INTERVAL": "0"})
    assert code == 0, output
    steps = int(next(line for line in output.splitlines() if line.startswith("training on")).split(", ")[-1].split()[0])
    lines = [line for line in output.splitlines() if line.startswith("gradient-blending: OGR weight estimate: ")]
    total = 3 * (1 + 2) * steps                      # 3 outputs x (1 epoch of training + 2 loss passes)
    assert lines and all(f"/{total} steps" in line for line in lines), output
    assert any("ETA" in line for line in lines)


def test_epoch_line_shows_rho_a_for_bimodal_runs_and_k_only_for_ogm():
    r = {"epoch": 2, "train": {"loss": 0.5, "acc": 0.75}, "val": {"acc": 0.5, "map": 0.6}, "test": {},
         "rho_a": 1.5, "rho_v": 1 / 1.5, "k_a": 0.2, "k_v": 1.0, "samples_per_s": 12.3}
    line = epoch_line(r, True, {"modality": "both", "modulation": "ogm-ge"})
    assert line == ("epoch 2 | loss 0.5000 | train acc 0.7500 | val acc 0.5000 mAP 0.6000 | "
                    "rho_a 1.5000 k_a 0.2000 k_v 1.0000 | 12 samples/s [green]*[/]")
    assert "k_a" not in epoch_line(r, False, {"modality": "both", "modulation": "none"})
    assert "rho" not in epoch_line(r, False, {"modality": "visual", "modulation": "none"})


def test_log_progress_line_and_tables_never_truncate():
    p = _ui.LogProgress("clips", extra="failures", interval=1e9)
    task = p.add_task("extract", total=200, failures="")
    p.update(task, completed=50, failures="[red]2 failed")
    t = p.tasks[task]
    line = p.line(t, t["start"] + 10.0)
    assert line == "extract: 50/200 clips (25%), 5.0 clips/s, ETA 0:00:30, 2 failed"
    with _ui.console.capture() as cap:
        _ui.console.print(_ui.table("runs", ["run", "acc"], [["concat+ogm-ge-with-a-very-long-name" * 4, "1.0"]]))
    assert "concat+ogm-ge-with-a-very-long-name" * 4 in cap.get()


def test_bar_rate_and_eta_come_from_the_average_since_start():
    """Slow steps (50 s each) still get a rate and an ETA; the final rate is the run's average."""
    import io

    from rich.console import Console
    from rich.progress import Progress

    now = [0.0]
    p = Progress(console=Console(file=io.StringIO()), get_time=lambda: now[0])
    t = p.add_task("epoch 0", total=10)
    now[0] = 100.0
    p.update(t, completed=2)
    task = p.tasks[0]
    assert _ui.RateColumn("steps").render(task).plain == "0.02 steps/s"
    assert _ui.EtaColumn().render(task).plain == "ETA 0:06:40"
    now[0] = 500.0
    p.update(t, completed=10)
    assert _ui.RateColumn("steps").render(p.tasks[0]).plain == "0.02 steps/s"


def test_ctrl_c_during_training_names_the_typed_command_and_it_resumes(shards, tmp_path, monkeypatch):
    """A real SIGINT mid-run of a training without --out: one line naming the command typed plus
    the run folder it made and --resume, exit 130; that command continues the run."""
    import shlex
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = ["--shards", str(shards), *TINY[:2], "--epochs", "50", *TINY[4:]]
    run = tmp_path / "runs" / "cremad-concat-ogm-ge-1"
    proc = subprocess.Popen([sys.executable, "-m", "ogmge_train", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "last.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.splitlines()[0] == "run folder: runs/cremad-concat-ogm-ge-1"
    typed = f"python -m ogmge_train {shlex.join(args)} --out runs/cremad-concat-ogm-ge-1 --resume"
    assert one_error_line(err) == f"error: interrupted; finished epochs are kept: `{typed}` continues from the last one"
    done = len((run / "metrics.jsonl").read_text().splitlines())
    assert 1 <= done < 50
    hinted = shlex.split(typed)[3:]
    hinted[hinted.index("--epochs") + 1] = str(done + 1)      # the hint's command, one more epoch
    monkeypatch.chdir(tmp_path)
    code, output = cli(*hinted)
    assert code == 0, output
    assert len((run / "metrics.jsonl").read_text().splitlines()) == done + 1
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["cremad-concat-ogm-ge-1"]


def test_train_without_out_makes_a_new_numbered_run_folder_and_says_so_first(shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["--shards", str(shards), *TINY, "--modality", "audio", "--modulation", "none"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines()[0] == "run folder: runs/cremad-audio-none-1"
    assert json.loads((tmp_path / "runs" / "cremad-audio-none-1" / "config.json").read_text())["out"] == \
        "runs/cremad-audio-none-1"
    again = CliRunner().invoke(main, ["--shards", str(shards), *TINY, "--modality", "audio", "--modulation", "none",
                                      "--json"], catch_exceptions=False)
    assert again.exit_code == 0 and again.stderr.splitlines()[0] == "run folder: runs/cremad-audio-none-2"
    assert json.loads(again.stdout)["epochs"] == 1                      # stdout stays the JSON document
    assert (tmp_path / "runs" / "cremad-audio-none-1" / "summary.json").is_file()   # the first run is untouched
    code, output = cli("--shards", shards, *TINY, "--resume")
    assert code == 2 and one_error_line(output) == "error: --resume needs --out RUN: the run folder to continue"
    code, output = cli("--shards", tmp_path / "nothing", *TINY)
    assert code == 2 and sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "cremad-audio-none-1", "cremad-audio-none-2"]                  # a refused run makes no folder
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "runs").write_text("a file, not a folder")
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, output = cli("--shards", shards, *TINY)
    assert code == 2 and one_error_line(output) == \
        "error: runs: cannot create the run folder (File exists); pass --out RUN"


def test_ctrl_c_hints_name_what_the_user_typed(shards, tmp_path, monkeypatch):
    import ogmge_train.sweep as sweep_mod
    import ogmge_train.train as train_mod

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train", interrupted)
    monkeypatch.setattr(sweep_mod, "sweep", interrupted)
    code, output = cli("--shards", shards, "--out", tmp_path / "r", "--epochs", "3")
    assert code == 130 and one_error_line(output) == (
        f"error: interrupted; finished epochs are kept: `ogmge-train --shards {shards} --out {tmp_path / 'r'} "
        "--epochs 3 --resume` continues from the last one")
    code, output = cli("--shards", shards, "--out", tmp_path / "r", "--resume")        # --resume is not doubled
    assert one_error_line(output).endswith(f"--out {tmp_path / 'r'} --resume` continues from the last one")
    code, output = cli("sweep", "--seeds", "0-2", "--shards", shards, "--out", tmp_path / "s")
    assert code == 130 and one_error_line(output) == (
        f"error: interrupted; finished seeds are kept: `ogmge-train sweep --seeds 0-2 --shards {shards} --out "
        f"{tmp_path / 's'}` skips them and resumes the interrupted seed from its last finished epoch")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")             # under torchrun its own options are not ours
    r = CliRunner().invoke(main, ["--shards", str(shards), "--out", "r"], prog_name="python -m ogmge_train")
    assert one_error_line(r.output) == ("error: interrupted; finished epochs are kept: `torchrun … -m ogmge_train "
                                        f"--shards {shards} --out r --resume` continues from the last one")


def test_a_step_of_an_outer_command_prints_the_outer_hint(shards, monkeypatch):
    """cli.demo runs the real commands in-process: Ctrl-C in one of them names `make demo`."""
    import ogmge_train.sweep as sweep_mod
    from cli import demo

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_mod, "sweep", interrupted)

    @click.command()
    @_ui.handle_errors(interrupt_hint=_ui.RESUME_HINT)
    def outer():
        demo._run("5/7 train", "ogmge-train", ["sweep", "--seeds", "0", "--shards", str(shards), "--out", "x"])

    r = CliRunner().invoke(outer, [], env={"OGMGE_COMMAND": "make demo"})
    assert r.exit_code == 130
    assert one_error_line(r.output) == "error: interrupted; finished work is kept: `make demo` resumes"


def test_typed_command_quotes_and_appends_only_missing_flags():
    @click.command(cls=_ui.Group)
    def group():
        pass

    ctx = group.make_context("avprep", ["verify", "my shards/", "--quick"])
    with ctx:
        assert _ui.typed_command() == "avprep verify 'my shards/' --quick"
        assert _ui.typed_command(["--quick", "--out", "a b", "--resume"]) == \
            "avprep verify 'my shards/' --quick --out 'a b' --resume"
        _ui.add_typed_arguments("--out", "runs/x-1")
        _ui.add_typed_arguments("--out", "runs/x-2")                  # already there: kept as first told
        assert _ui.typed_arguments() == ["verify", "my shards/", "--quick", "--out", "runs/x-1"]


def test_rules_in_a_log_are_plain_lines():
    import io

    c = _ui._Console(file=io.StringIO(), width=_ui._LOG_WIDTH, force_terminal=False)
    c.rule("[bold]3/7 extract shards")
    c.rule()
    lines = c.file.getvalue().splitlines()
    assert lines == ["── 3/7 extract shards " + "─" * 58, "─" * 80]


def test_a_flag_named_by_a_shown_default_is_an_option_of_that_command():
    """e.g. train's --shards "required unless --resume" (sweep and reproduce have no --resume)."""
    for group in (main, avprep_main):
        for name, cmd in group.commands.items():
            flags = {o for p in cmd.params for o in getattr(p, "opts", [])}
            for p in cmd.params:
                shown = getattr(p, "show_default", None)
                for flag in re.findall(r"unless (--[a-z-]+)", shown if isinstance(shown, str) else ""):
                    assert flag in flags, (name, p.name, shown)
    sweep_shards = next(p for p in main.commands["sweep"].params if p.name == "shards")
    assert sweep_shards.required