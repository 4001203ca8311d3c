"""Faults around a training run (issue 23): one writer per run folder, a resume or an evaluation
that checks which dataset it is given, a loader that refuses leaks and relabelled data, a first
checkpoint that survives kill -9 at each write, typed one-line errors for a lost DDP peer.

Runs killed with SIGKILL are real ``ogmge-train`` processes (a wrapper around the CLI kills itself
at an exact write); their resumed results are compared with an uninterrupted run of the same
command, bit for bit (wall times aside).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from avprep import shardformat as sf
from avprep.shardformat import ShardDataError
from cli._ui import describe
from ogmge_train import data, runfolder
from ogmge_train import train as train_mod
from ogmge_train.config import resolve
from ogmge_train.errors import ConfigError, PeerLostError, RunFolderError
from tests._helpers import REPO, read_jsonl, strip_wall_time, torchrun

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FLAGS = ["--preset", "demo", "--epochs", "2", "--batch-size", "8", "--image-size", "32", "--device", "cpu"]

# Runs the ogmge-train CLI. OGMGE_TEST_KILL="<file>:<n>" SIGKILLs the process at the n-th write of
# <file>: for a jsonl file just after the line is appended, for any other file once its temporary
# file is complete, just before the rename. OGMGE_TEST_HOLD=<flag file> blocks the first
# metrics.jsonl append (creating <flag file>.waiting) until the flag file exists. OGMGE_TEST_KILL_STEP=<n> SIGKILLs rank
# OGMGE_TEST_KILL_RANK (default 0) just before its n-th optimizer step.
_WRAPPER = """
import os, signal, sys, time
from ogmge_train import plugin, runfolder
target, _, n = os.environ.get("OGMGE_TEST_KILL", "").partition(":")
left = [int(n or 0)]
def hit(path):
    if os.path.basename(str(path)) == target:
        left[0] -= 1
        if left[0] == 0:
            os.kill(os.getpid(), signal.SIGKILL)
real_append, real_atomic = runfolder.append_jsonl, runfolder._write_atomic
hold = os.environ.get("OGMGE_TEST_HOLD")
def append_jsonl(path, rows):
    global hold
    if hold and os.path.basename(str(path)) == "metrics.jsonl":
        open(hold + ".waiting", "w").close()
        while not os.path.exists(hold):
            time.sleep(0.02)
        hold = None
    real_append(path, rows)
    hit(path)
def _write_atomic(path, write):
    def then_kill(tmp):
        write(tmp)
        hit(path)
    return real_atomic(path, then_kill)
runfolder.append_jsonl, runfolder._write_atomic = append_jsonl, _write_atomic
step = int(os.environ.get("OGMGE_TEST_KILL_STEP", "0"))
if step and os.environ.get("RANK", "0") == os.environ.get("OGMGE_TEST_KILL_RANK", "0"):
    real_gen, calls = plugin.step_generator, [0]
    def gen(*a):
        calls[0] += 1
        if calls[0] == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_gen(*a)
    plugin.step_generator = gen
from cli.train_cli import main
sys.argv[0] = "ogmge-train"
main()
"""


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OGMGE_TEST_KILL": "", **extra}


def cli_command(shards: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-c", _WRAPPER, "--shards", str(shards), "--out", str(out), *FLAGS, *extra]


def run_cli(cmd, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def shards(train_shards):
    return train_shards()


def tiny(shards, out, **kw):
    kw = {"epochs": 2, "batch_size": 8, "image_size": 32, "workers": 0, "device": "cpu", **kw}
    return resolve("demo", shards=str(shards), out=str(out), **kw)


# ---------------------------------------------------------------- defect 1: one writer per run folder

def test_a_second_run_into_one_out_is_refused_naming_the_holder(shards, tmp_path):
    out, flag = tmp_path / "run", tmp_path / "go"
    first = subprocess.Popen(cli_command(shards, out, "--fusion", "concat"), cwd=REPO,
                             env=_env(OGMGE_TEST_HOLD=str(flag)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 120
        while not Path(f"{flag}.waiting").exists():       # epoch 0 trained, about to be recorded
            assert first.poll() is None and time.monotonic() < deadline, "the first run stopped early"
            time.sleep(0.05)
        second = run_cli(cli_command(shards, out, "--fusion", "sum"))
        assert second.returncode == 2, second.stderr
        assert error_lines(second.stderr) == [f"error: {out}: another run is writing into this folder (pid "
                                              f"{first.pid} on {os.uname().nodename}, since "
                                              + error_lines(second.stderr)[0].split(", since ")[1]]
        assert "wait for it to finish or choose another --out" in second.stderr
    finally:
        flag.touch()
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1]
    assert json.loads((out / "config.json").read_text())["fusion"] == "concat"
    assert ckpt(out / "last.pt")["config"]["fusion"] == "concat"
    assert len({r["step"] for r in read_jsonl(out / "steps.jsonl")}) == len(read_jsonl(out / "steps.jsonl"))


def test_a_lock_left_by_a_killed_run_is_taken_over(shards, tmp_path):
    out = tmp_path / "run"
    # killed mid-epoch 1 with its two DataLoader workers running
    killed = run_cli(cli_command(shards, out, "--workers", "2"), OGMGE_TEST_KILL_STEP="9")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert json.loads((out / runfolder.LOCK).read_text())["pid"] > 0
    resumed = subprocess.Popen(cli_command(shards, out, "--workers", "2", "--resume"), cwd=REPO, env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert json.loads((out / runfolder.LOCK).read_text())["pid"] == resumed.pid
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1]


def test_forked_children_do_not_keep_the_lock(tmp_path):
    """A DataLoader worker forked while the lock is held must not hold it once the run is gone."""
    run = tmp_path / "run"
    with runfolder.writer_lock(run):
        with pytest.raises(RunFolderError, match=f"pid {os.getpid()} on "):
            with runfolder.writer_lock(run):
                pass
        ready_r, ready_w = os.pipe()
        child = os.fork()
        if child == 0:          # an orphan that outlives its parent's lock (fork hooks have run)
            os.write(ready_w, b"1")
            time.sleep(30)
            os._exit(0)
        os.read(ready_r, 1)
    try:
        with runfolder.writer_lock(run):       # the parent let go: the child holds nothing
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


# ---------------------------------------------------------------- defect 6: kill -9 at each write

@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    r = run_cli(cli_command(shards, out))
    assert r.returncode == 0, r.stderr
    return out


def _same_run(run: Path, reference: Path) -> None:
    metrics = (strip_wall_time(read_jsonl(r / "metrics.jsonl")) for r in (run, reference))
    assert next(metrics) == next(metrics)
    assert (run / "steps.jsonl").read_bytes() == (reference / "steps.jsonl").read_bytes()
    assert json.loads((run / "summary.json").read_text()) == json.loads((reference / "summary.json").read_text())
    for name in ("last.pt", "best.pt"):
        a, b = ckpt(run / name), ckpt(reference / name)
        assert a["epoch"] == b["epoch"], name
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"]), name
    assert not list(run.glob("*.tmp")), "a temporary file was left behind"


@pytest.mark.parametrize("kill", [
    "metrics.jsonl:1", "last.pt:1", "best.pt:2", *(pytest.param(k, marks=pytest.mark.slow) for k in (
        "config.json:1", "steps.jsonl:1", "best.pt:1", "summary.json:1", "metrics.jsonl:2", "last.pt:2",
        "steps.jsonl:2", "summary.json:2"))])
def test_killed_at_a_write_then_resumed_equals_an_uninterrupted_run(shards, reference, tmp_path, kill):
    """Every write of a two-epoch run (epoch 1 is the best one: best.pt is written twice)."""
    assert ckpt(reference / "best.pt")["epoch"] == 1
    out = tmp_path / "run"
    r = run_cli(cli_command(shards, out), OGMGE_TEST_KILL=kill)
    assert r.returncode == -signal.SIGKILL, r.stderr
    name = kill.split(":")[0]
    if not name.endswith(".jsonl"):
        assert (out / f"{name}.tmp").is_file()        # the kill left a complete temporary file
    r = run_cli(cli_command(shards, out, "--resume"))
    assert r.returncode == 0, r.stderr
    if kill == "metrics.jsonl:1":
        assert "epoch 0 was recorded but its checkpoint was never written" in r.stderr
    _same_run(out, reference)


def test_resume_still_refuses_results_that_lost_their_last_pt(shards, tmp_path):
    """Recovery covers only a lost *first* checkpoint: a run with best.pt or later epochs but no
    last.pt was not stopped by a kill, and is never started over."""
    out = tmp_path / "run"
    train_mod.train(tiny(shards, out, epochs=1))
    (out / "last.pt").unlink()
    with pytest.raises(RunFolderError, match="no last.pt"):
        train_mod.train(tiny(shards, out, epochs=2), resume=True)


# ---------------------------------------------------------------- defect 2: resume/evaluate check the dataset

def _edit_dataset(src: Path, dst: Path, classes: list[str], index_label=None) -> Path:
    """A copy of shard folder ``src`` whose dataset.json lists ``classes`` and whose index labels
    are renamed consistently (what a re-extraction with other class names gives)."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "dataset.json").read_text())
    old = meta["classes"]
    meta["classes"] = classes
    (dst / "dataset.json").write_text(json.dumps(meta))
    rename = dict(zip(old, classes))
    for split in meta["splits"]:
        path = dst / sf.index_name(split)
        rows = read_jsonl(path)
        for r in rows:
            r["label"] = rename[r["label"]]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        m = json.loads((dst / sf.manifest_name(split)).read_text())
        m["class_counts"] = {rename[k]: v for k, v in m["class_counts"].items()}
        (dst / sf.manifest_name(split)).write_text(json.dumps(m))
    return dst


@pytest.fixture(scope="module")
def stopped_run(shards, tmp_path_factory):
    """A run that finished epoch 0 of 2."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    train_mod.train(tiny(shards, out, epochs=1))
    return out


def _resume(run: Path, shards: Path, tmp_path: Path, **kw):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    events: list[dict] = []
    summary = train_mod.train(tiny(shards, out, **kw), resume=True, on_event=events.append)
    return out, summary, events


def test_resume_refuses_shards_whose_class_names_differ(shards, stopped_run, tmp_path):
    classes = json.loads((shards / "dataset.json").read_text())["classes"]
    renamed = _edit_dataset(shards, tmp_path / "renamed", classes[1:] + ["zulu"])
    with pytest.raises(ConfigError) as e:
        _resume(stopped_run, renamed, tmp_path)
    message, code = describe(e.value)
    assert code == 2 and "\n" not in message and "(a bug" not in message
    assert f"class names (0: {classes[0]!r} -> {classes[1]!r}, 1: {classes[1]!r} -> {classes[2]!r}" in message
    assert "cannot resume on cremad: the dataset differs from the one this run was trained on" in message


def test_resume_and_evaluate_refuse_another_class_count_with_one_line(shards, stopped_run, tmp_path):
    classes = json.loads((shards / "dataset.json").read_text())["classes"]
    more = _edit_dataset(shards, tmp_path / "more", [*classes, "zulu"])
    with pytest.raises(ConfigError) as e:
        _resume(stopped_run, more, tmp_path)
    message, code = describe(e.value)
    assert code == 2 and "(a bug" not in message
    assert f"{len(classes)} classes -> {len(classes) + 1}" in message
    with pytest.raises(ConfigError, match=f"cannot evaluate on cremad: .*{len(classes)} classes -> "):
        train_mod.evaluate(stopped_run, shards=str(more), device="cpu", workers=0)
    swapped = _edit_dataset(shards, tmp_path / "swapped", [classes[1], classes[0], *classes[2:]])
    with pytest.raises(ConfigError, match=f"class names \\(0: {classes[0]!r} -> {classes[1]!r}"):
        train_mod.evaluate(stopped_run, shards=str(swapped), device="cpu", workers=0)


def test_resume_on_other_clips_of_the_same_classes_says_so_once(stopped_run, train_shards, tmp_path):
    other = train_shards(seed=1)
    out, summary, events = _resume(stopped_run, other, tmp_path)
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert len(warnings) == 1 and "same classes, but other clips" in warnings[0]
    assert "train" in warnings[0] and summary["epochs"] == 2


def test_the_fingerprint_is_in_every_checkpoint(stopped_run, shards):
    fp = ckpt(stopped_run / "last.pt")["dataset"]
    meta = json.loads((shards / "dataset.json").read_text())
    assert fp["name"] == "cremad" and fp["classes"] == meta["classes"]
    assert {s: v["samples"] for s, v in fp["splits"].items()} == meta["splits"]
    assert fp["inputs"]["spec"] == meta["config"]["spec"] and fp["inputs"]["spec_shape"] == meta["spec_shape"]
    assert ckpt(stopped_run / "best.pt")["dataset"] == fp


def test_a_checkpoint_whose_weights_do_not_fit_is_a_config_error(stopped_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    c = ckpt(run / "best.pt")
    c["classes"] = [*c["classes"], "zulu"]
    torch.save(c, run / "best.pt")
    with pytest.raises(ConfigError, match="its weights do not fit the model its config describes"):
        train_mod.load_run(run)


# ---------------------------------------------------------------- defect 3: the loader refuses leaks

def _add_shard(shards: Path, dst: Path, src_split: str, src_shard: int, split: str, number: int) -> list[str]:
    """Copy shard ``src_shard`` of ``src_split`` into ``split`` as shard ``number`` (bytes, index
    lines, manifest entry, dataset.json count): its samples then appear twice. Returns their keys."""
    if not dst.exists():
        shutil.copytree(shards, dst)
    src_name, name = sf.shard_name(src_split, src_shard), sf.shard_name(split, number)
    shutil.copyfile(dst / src_name, dst / name)
    rows = [dict(r, shard=name) for r in read_jsonl(dst / sf.index_name(src_split)) if r["shard"] == src_name]
    with open(dst / sf.index_name(split), "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    m = json.loads((dst / sf.manifest_name(split)).read_text())
    entry = next(e for e in json.loads((dst / sf.manifest_name(src_split)).read_text())["shards"]
                 if e["name"] == src_name)
    m["shards"].append(dict(entry, name=name))
    m["num_samples"] += len(rows)
    (dst / sf.manifest_name(split)).write_text(json.dumps(m))
    meta = json.loads((dst / "dataset.json").read_text())
    meta["splits"][split] += len(rows)
    (dst / "dataset.json").write_text(json.dumps(meta))
    return [r["key"] for r in rows]


def _train_loader(shards, workers=0):
    return data.make_loader(shards, "train", train=True, batch_size=4, frames=1, image_size=8, workers=workers)


def test_a_test_sample_inside_train_stops_the_loader_and_training(shards, tmp_path):
    leaky = tmp_path / "leaky"
    keys = _add_shard(shards, leaky, "test", 0, "train", 90)
    with pytest.raises(ShardDataError, match=f"test.samples.jsonl: key {keys[0]} of test-000000.tar is also in "
                                             "train-000090.tar of split train") as e:
        _train_loader(leaky)
    assert e.value.check == "index" and "\n" not in str(e.value)
    with pytest.raises(ShardDataError, match="a leak between splits"):
        train_mod.train(tiny(leaky, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_key_repeated_across_shards_stops_the_loader(shards, tmp_path):
    twice = tmp_path / "twice"
    keys = _add_shard(shards, twice, "train", 0, "train", 91)
    with pytest.raises(ShardDataError, match=f"key {keys[0]} of train-000091.tar is also in train-000000.tar "
                                             r"\(a sample"):
        _train_loader(twice)


def test_swapped_class_names_in_dataset_json_stop_the_loader(shards, tmp_path):
    swapped = tmp_path / "swapped"
    shutil.copytree(shards, swapped)
    meta = json.loads((swapped / "dataset.json").read_text())
    a, b = meta["classes"][:2]
    meta["classes"][:2] = [b, a]
    (swapped / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ShardDataError) as e:
        _train_loader(swapped)
    assert (f"is labelled {a!r} (label_index 0) but dataset.json lists {b!r} at 0" in str(e.value)
            or f"is labelled {b!r} (label_index 1) but dataset.json lists {a!r} at 1" in str(e.value))


@pytest.mark.parametrize("workers", [0, 2])
def test_an_index_label_that_disagrees_with_the_shard_stops_the_loader(shards, tmp_path, workers):
    edited = tmp_path / "edited"
    shutil.copytree(shards, edited)
    meta = json.loads((edited / "dataset.json").read_text())
    rows = read_jsonl(edited / "train.samples.jsonl")
    r = rows[3]
    r["label_index"] = (r["label_index"] + 1) % len(meta["classes"])
    r["label"] = meta["classes"][r["label_index"]]       # consistent with dataset.json, not with the tar
    (edited / "train.samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    with pytest.raises(ShardDataError) as e:
        for _ in data.make_loader(edited, "train", train=False, batch_size=4, frames=1, image_size=8,
                                  workers=workers):
            pass
    assert str(e.value) == (f"{edited / 'train-000000.tar'}: sample {r['key']}: label "
                            f"{(r['label_index'] - 1) % len(meta['classes'])} in the shard but {r['label_index']} "
                            "in the sample index")


# ---------------------------------------------------------------- defect 10: a lost DDP peer

def test_a_rank_that_loses_its_peer_says_so_in_one_typed_line(train_shards, tmp_path):
    """Rank 1 is SIGKILLed in epoch 1; rank 0, inside a collective, reports the loss. (torchrun's
    default 0.1 s monitor may SIGTERM the survivor before it reports: the test gives it 10 s.)"""
    shards, out = train_shards(shard_size=3), tmp_path / "run"
    script = tmp_path / "wrapper.py"
    script.write_text(_WRAPPER)
    cmd = [*torchrun(), "--standalone", "--monitor-interval", "10", "--nproc-per-node", "2", str(script),
           "--shards", str(shards),
           "--out", str(out), *FLAGS, "--epochs", "3", "--batch-size", "4", "--workers", "0"]
    env = _env(OGMGE_TEST_KILL_STEP="7", OGMGE_TEST_KILL_RANK="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    assert re.match(r"error: rank 0: lost contact with another training process \(Connection (closed|reset) by "
                    r"peer[^)]*\); ", lines[0]), lines[0]
    assert f"the last finished epoch is saved in {out}: rerun with --resume to continue" in lines[0]
    assert "(a bug" not in r.stderr
    assert PeerLostError.exit_code == 1
