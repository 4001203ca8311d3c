"""`avprep extract` killed with SIGKILL and re-run ends byte-identical to an uninterrupted run.

Two kinds of kill: from outside (the whole process group, workers included, as soon as the
output folder reaches a state: first shard, half the shards), and from inside at an exact
instant (the CLI runs in a wrapper that SIGKILLs itself when it is about to rename a shard
into place, or to write the first manifest). Every output file is compared byte for byte,
manifests, sample indexes, dataset.json and failures.jsonl included; only the resume state
folder (``.avprep-state``) is ignored.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avprep import synth
from avprep.outdir import STATE_DIR
from avprep.verify import verify

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = ["--dataset", "folder", "--duration", "2", "--frame-size", "64", "--shard-size", "2", "--max-failures", "0.5"]

# Runs the CLI; AVPREP_TEST_KILL="replace:N" SIGKILLs the process just before the N-th shard
# is renamed into place (its complete temp file stays behind), "manifest" just before the
# first manifest is written. Works with --workers 1 (shards are written in this process).
_WRAPPER = """
import os, signal, sys
import avprep.shards as shards
mode = os.environ.get("AVPREP_TEST_KILL", "")
if mode.startswith("replace:"):
    left = [int(mode.split(":")[1])]
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        if str(dst).endswith(".tar"):
            left[0] -= 1
            if left[0] == 0:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *a, **k)
    os.replace = replace
elif mode == "manifest":
    real_write = shards.atomic_write_bytes
    def write(path, data, **kwargs):
        if str(path).endswith(".manifest.json"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(path, data, **kwargs)
    shards.atomic_write_bytes = write
from cli.avprep_cli import main
sys.argv[0] = "avprep"
main()
"""


def command(raw: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", _WRAPPER, "extract", *OPTIONS, "--src", str(raw), "--out", str(out), *extra]


def run(cmd, kill: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "AVPREP_TEST_KILL": kill}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def kill_when(cmd, ready, timeout: float = 300) -> None:
    """Start ``cmd`` in its own process group and SIGKILL the whole group once ``ready()``."""
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and not ready():
            assert time.monotonic() < deadline, "extraction never reached the kill point"
            time.sleep(0.005)
        assert proc.poll() is None, "extraction finished before the kill point"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of ``out`` except the resume state, by relative path."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and STATE_DIR not in p.relative_to(out).parts}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """10 real clips over 3 classes (hash splits: several shards per split) and one broken clip."""
    root = synth.make_dataset("folder", tmp_path_factory.mktemp("resume") / "raw", 10, num_classes=3,
                              duration=2.0, fps=5, size=(80, 60))
    (root / "alpha" / "broken.mp4").write_bytes(b"not a video")
    return root


@pytest.fixture(scope="module")
def clean(raw, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("clean") / "out"
    r = run(command(raw, out, "--workers", "2"))
    assert r.returncode == 0, r.stderr
    snap = snapshot(out)
    shards = [n for n in snap if n.endswith(".tar")]
    assert len(shards) >= 4 and b"broken" in snap["failures.jsonl"]
    assert {"dataset.json", "failures.jsonl"} <= set(snap)
    assert verify(out).ok
    return snap


def assert_resumes_identically(raw: Path, out: Path, clean: dict[str, bytes], workers: str = "1"):
    r = run(command(raw, out, "--workers", workers))
    assert r.returncode == 0, r.stderr
    assert not list(out.rglob("*.tmp-*")), "stale temp files left behind"
    snap = snapshot(out)
    assert sorted(snap) == sorted(clean)
    assert [n for n in snap if snap[n] != clean[n]] == []
    assert verify(out).ok


def test_kill_after_first_shard_then_resume(raw, clean, tmp_path):
    out = tmp_path / "out"
    kill_when(command(raw, out, "--workers", "2"), lambda: any(out.glob("*.tar")))
    assert not (out / "dataset.json").exists()
    assert_resumes_identically(raw, out, clean, workers="2")


def test_kill_before_rename_then_other_options_exit_2_then_resume(raw, clean, tmp_path):
    out = tmp_path / "out"
    r = run(command(raw, out, "--workers", "1"), kill="replace:2")
    assert r.returncode == -signal.SIGKILL
    assert len(list(out.glob("*.tar"))) == 1 and len(list(out.glob("*.tar.tmp-*"))) == 1

    # resuming with other options is refused (exit 2) and touches nothing
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = run(command(raw, out, "--workers", "1", "--jpeg-quality", "80"))
    assert r.returncode == 2, r.stderr
    assert "other options" in r.stderr and "jpeg_quality" in r.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    assert_resumes_identically(raw, out, clean)


@pytest.mark.slow
def test_kill_just_before_manifests_then_resume(raw, clean, tmp_path):
    out = tmp_path / "out"
    r = run(command(raw, out, "--workers", "1"), kill="manifest")
    assert r.returncode == -signal.SIGKILL
    assert (out / "failures.jsonl").exists() and not list(out.glob("*.manifest.json"))
    assert_resumes_identically(raw, out, clean)


@pytest.mark.slow
def test_kill_midway_then_resume(raw, clean, tmp_path):
    out = tmp_path / "out"
    half = sum(n.endswith(".tar") for n in clean) // 2
    kill_when(command(raw, out, "--workers", "2"), lambda: len(list(out.glob("*.tar"))) >= half)
    assert_resumes_identically(raw, out, clean, workers="2")


@pytest.mark.slow
def test_killed_twice_then_resume(raw, clean, tmp_path):
    out = tmp_path / "out"
    assert run(command(raw, out, "--workers", "1"), kill="replace:2").returncode == -signal.SIGKILL
    assert run(command(raw, out, "--workers", "1"), kill="replace:2").returncode == -signal.SIGKILL
    assert_resumes_identically(raw, out, clean)
