"""Engines: serial, a local process pool and Ray give the same bytes, events and resume; a worker
killed mid-task is retried; `avprep extract` killed with SIGKILL leaves no process behind.

Ray runs as a local 2-CPU cluster started once for the module (``ray.init`` in this process)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avprep import synth
from avprep.config import ExtractConfig, spec_preset
from avprep.engines import LocalEngine, RayEngine, SerialEngine, make_engine
from avprep.extract import extract
from avprep.verify import verify

ROOT = Path(__file__).resolve().parent.parent
N_CLIPS = 12


def _cfg(shard_size: int = 100) -> ExtractConfig:
    return ExtractConfig(spec=spec_preset("paper", "folder", duration=2.0), frame_size=32,
                         shard_size=shard_size)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _events(events) -> list[tuple]:
    return [(e.kind, e.shard, e.key, e.stage, e.done, e.failed, e.total) for e in events]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """One class only: with a big shard size every split is one shard."""
    root = synth.make_dataset("folder", tmp_path_factory.mktemp("eng") / "raw", N_CLIPS, num_classes=2,
                              duration=2.0, fps=5, size=(64, 48))
    (root / "alpha" / "broken.mp4").write_bytes(b"not a video")
    return root


@pytest.fixture(scope="module")
def serial(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    events = []
    result = extract("folder", raw, out, _cfg(), engine="serial", max_failures=1.0, on_event=events.append)
    assert result.num_samples == N_CLIPS and result.engine == "serial"
    return out, events


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


class _KillFirst:
    """Wraps a worker callable: the first call (over all processes) SIGKILLs its own process."""

    def __init__(self, fn, marker: Path):
        self.fn, self.marker = fn, marker

    def __call__(self, task):
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return self.fn(task)
        os.kill(os.getpid(), signal.SIGKILL)


def _killing(engine_class, marker: Path, **kw):
    class Killing(engine_class):
        def _start(self, fn):
            super()._start(_KillFirst(fn, marker))
    return Killing(**kw)


def test_two_local_workers_on_one_shard_use_both_and_match_serial(raw, serial, tmp_path):
    events = []
    result = extract("folder", raw, tmp_path, _cfg(), engine="local", workers=2, max_failures=1.0,
                     on_event=events.append)
    assert [p.name for p in tmp_path.glob("train-*.tar")] == ["train-000000.tar"]    # one shard
    assert _files(tmp_path) == _files(serial[0])
    assert _events(events) == _events(serial[1])
    assert len(result.worker_pids) == 2 and os.getpid() not in result.worker_pids


def test_local_worker_killed_mid_task_is_retried(raw, serial, tmp_path):
    engine = _killing(LocalEngine, tmp_path / "killed", workers=2)
    result = extract("folder", raw, tmp_path / "out", _cfg(), engine=engine, max_failures=1.0)
    assert (tmp_path / "killed").exists() and result.num_samples == N_CLIPS
    assert _files(tmp_path / "out") == _files(serial[0])


def test_ray_matches_serial_bytes_and_events(raw, serial, ray_cluster, tmp_path):
    events = []
    result = extract("folder", raw, tmp_path, _cfg(), engine="ray", max_failures=1.0, on_event=events.append)
    assert result.engine == "ray" and os.getpid() not in result.worker_pids
    assert _files(tmp_path) == _files(serial[0])
    assert _events(events) == _events(serial[1])
    assert ray_cluster.is_initialized()        # a cluster it did not start is left running


def test_ray_worker_killed_mid_task_still_completes(raw, serial, ray_cluster, tmp_path):
    engine = _killing(RayEngine, tmp_path / "killed")
    out = tmp_path / "out"
    result = extract("folder", raw, out, _cfg(shard_size=3), engine=engine, max_failures=1.0)
    assert (tmp_path / "killed").exists() and result.num_samples == N_CLIPS
    assert verify(out).ok
    reference = tmp_path / "ref"
    extract("folder", raw, reference, _cfg(shard_size=3), engine="serial", max_failures=1.0)
    assert _files(out) == _files(reference)


def test_ray_and_local_to_s3_match_serial(raw, serial, ray_cluster, s3_server, tmp_path):  # noqa: F811
    bucket = s3_server.new_bucket()
    client = s3_server.client()
    for engine in ("ray", "local"):
        url = f"s3://{bucket}/{engine}"
        extract("folder", raw, url, _cfg(), engine=engine, workers=2, max_failures=1.0,
                staging=tmp_path / engine, s3_endpoint=s3_server.endpoint)
        listing = client.list_objects_v2(Bucket=bucket, Prefix=f"{engine}/")["Contents"]
        got = {o["Key"].split("/", 1)[1]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
               for o in listing}
        assert got == _files(serial[0])


def test_make_engine_defaults():
    assert isinstance(make_engine(None, 1), SerialEngine)
    assert isinstance(make_engine(None, 3), LocalEngine) and make_engine(None, 3).workers == 3
    assert isinstance(make_engine(None, ray_address="auto"), RayEngine)


# ---------------------------------------------------------------- kill -9 leaves nothing behind

def _descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")
def test_kill_9_of_extract_leaves_no_process(tmp_path):
    raw = synth.make_dataset("folder", tmp_path / "raw", 24, num_classes=2, duration=3.0, fps=10,
                             size=(160, 120))
    cmd = [sys.executable, "-m", "cli.avprep_cli", "extract", "--dataset", "folder", "--src", str(raw),
           "--out", str(tmp_path / "out"), "--workers", "2", "--engine", "local", "--duration", "3"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and len(seen) < 4:     # resource tracker, forkserver, 2 workers
            assert time.monotonic() < deadline, "workers never started"
            seen |= _descendants(proc.pid)
            time.sleep(0.005)
        assert proc.poll() is None, "extraction finished before the kill"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 20
        while any(map(_alive, seen)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in seen if _alive(p)]
    finally:
        for p in seen | {proc.pid}:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


_CHURN = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from avprep.engines import keep_heap
    keep_heap()
def clip():     # what a 10 s clip allocates and frees: a few arrays of megabytes
    arrays = [np.ones(1 << 20) for _ in range(6)]
    return sum(float(a[0]) for a in arrays)
clip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    clip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="M_TOP_PAD is glibc's")
def test_keep_heap_stops_page_faulting_each_clips_arrays_in_again():
    faults = {mode: int(subprocess.run([sys.executable, "-c", _CHURN, mode], check=True, capture_output=True,
                                       text=True, cwd=ROOT).stdout) for mode in ("default", "keep")}
    assert faults["default"] > 20 * 2000          # megabytes handed back and faulted in each time
    assert faults["keep"] < faults["default"] / 10


@pytest.mark.parametrize("shard_sizes, workers", [([24], 2), ([1000], 64), ([3, 50, 7], 4), ([5], 1)])
def test_tasks_cover_the_plan_in_order_and_shrink_towards_the_end(shard_sizes, workers):
    from avprep.clipwork import MAX_TASK_CLIPS, make_tasks
    from avprep.datasets._base import Clip
    from avprep.shards import ShardPlan
    plans = [ShardPlan(f"s-{i:06d}.tar", "train", tuple(Clip(f"{i}-{k:04d}", "a", "train", Path("x"))
                                                        for k in range(n))) for i, n in enumerate(shard_sizes)]
    tasks = make_tasks(plans, workers)
    assert [c for t in tasks for c in t.clips] == [c for p in plans for c in p.clips]
    for p in plans:
        mine = [t for t in tasks if t.shard == p.name]
        assert [t.last for t in mine] == [False] * (len(mine) - 1) + [True]
        assert [c for t in mine for c in t.clips] == list(p.clips)     # no task spans two shards
    sizes = [len(t.clips) for t in tasks]
    assert max(sizes) <= MAX_TASK_CLIPS
    if workers > 1:       # the end of the run is single clips: the tail balances
        assert sizes[-workers:] == [1] * workers
