"""Engines: serial, a local process pool and Ray give the same bytes, events and resume; a worker
killed mid-task is retried; `avprep extract` killed with SIGKILL leaves no process behind. Under
Ray each shard is written (and, for s3://, uploaded) by a task on the cluster: the driver gets
only shard states back, never sample bytes.

Ray runs as a local 2-CPU cluster started once for the module (``ray.init`` in this process,
after the fake AWS credentials are set, so its workers can reach the moto server)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from avprep import synth
from avprep.clipwork import BuiltShard, ClipDone, ShardBuilder
from avprep.config import ExtractConfig, spec_preset
from avprep.engines import LocalEngine, RayEngine, SerialEngine, make_engine
from avprep.extract import extract
from avprep.outdir import STATE_DIR
from avprep.shards import ShardWriter
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
def serial3(raw, tmp_path_factory) -> dict[str, bytes]:
    """The reference with several shards (3 clips each)."""
    out = tmp_path_factory.mktemp("serial3")
    extract("folder", raw, out, _cfg(shard_size=3), engine="serial", max_failures=1.0)
    files = _files(out)
    assert sum(n.endswith(".tar") for n in files) >= 4
    return files


@pytest.fixture(scope="module")
def ray_cluster(aws_env):
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


class _Gets:
    """Wraps ``ray.get``: every value the driver receives from Ray."""

    def __init__(self, ray, monkeypatch):
        self.values: list = []
        real = ray.get

        def get(*args, **kwargs):
            value = real(*args, **kwargs)
            self.values.append(value)
            return value

        monkeypatch.setattr(ray, "get", get)


def test_ray_matches_serial_bytes_and_events(raw, serial, ray_cluster, tmp_path, monkeypatch):
    gets = _Gets(ray_cluster, monkeypatch)
    events = []
    result = extract("folder", raw, tmp_path, _cfg(), engine="ray", max_failures=1.0, on_event=events.append)
    assert result.engine == "ray" and os.getpid() not in result.worker_pids
    assert _files(tmp_path) == _files(serial[0])
    assert _events(events) == _events(serial[1])
    assert ray_cluster.is_initialized()        # a cluster it did not start is left running
    # the driver got shard states only: no sample bytes, the shard written by another process
    assert gets.values and all(isinstance(v, BuiltShard) for v in gets.values)
    assert all(v.writer != os.getpid() and not v.state.in_bucket for v in gets.values)
    assert {v.state.name for v in gets.values} == {n for n in _files(serial[0]) if n.endswith(".tar")}
    assert not list(tmp_path.glob("*.tmp-*"))


def test_ray_worker_killed_mid_task_still_completes(raw, serial3, ray_cluster, tmp_path):
    engine = _killing(RayEngine, tmp_path / "killed")
    out = tmp_path / "out"
    result = extract("folder", raw, out, _cfg(shard_size=3), engine=engine, max_failures=1.0)
    assert (tmp_path / "killed").exists() and result.num_samples == N_CLIPS
    assert verify(out).ok
    assert _files(out) == serial3


@dataclass(frozen=True)
class _KillFirstBuilder(ShardBuilder):
    """The first build (over all processes) writes one sample into its temp file and SIGKILLs
    its own process: a shard writer dying mid-write."""

    marker: str = ""

    def __call__(self, shard, split, results):
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return super().__call__(shard, split, results)
        writer = ShardWriter(Path(self.out) / shard)
        writer.add_encoded(next(o for r in results for o in r.clips if isinstance(o, ClipDone)).sample)
        writer._file.flush()
        assert writer.tmp.stat().st_size > 0
        os.kill(os.getpid(), signal.SIGKILL)


def test_ray_builder_killed_mid_write_is_retried_and_leaves_no_temp_file(raw, serial3, ray_cluster, tmp_path):
    marker = str(tmp_path / "killed")

    class KillingBuilder(RayEngine):
        def build_shards(self, fn, tasks, build, on_clip, on_shard):
            build = _KillFirstBuilder(build.out, build.bucket, marker=marker)
            return super().build_shards(fn, tasks, build, on_clip, on_shard)

    out = tmp_path / "out"
    result = extract("folder", raw, out, _cfg(shard_size=3), engine=KillingBuilder(), max_failures=1.0)
    assert Path(marker).exists() and result.num_samples == N_CLIPS
    assert not list(out.glob("*.tmp-*"))        # the dead writer's temp file is gone
    assert verify(out).ok
    assert _files(out) == serial3


def _bucket(s3_server, bucket: str, prefix: str) -> dict[str, bytes]:
    client = s3_server.client()
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"][len(prefix):]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            for o in listing}


def test_ray_and_local_to_s3_match_serial(raw, serial, ray_cluster, s3_server, tmp_path, monkeypatch):  # noqa: F811
    bucket = s3_server.new_bucket()
    for engine in ("ray", "local"):
        gets = _Gets(ray_cluster, monkeypatch)
        extract("folder", raw, f"s3://{bucket}/{engine}", _cfg(), engine=engine, workers=2, max_failures=1.0,
                staging=tmp_path / engine, s3_endpoint=s3_server.endpoint)
        assert _bucket(s3_server, bucket, f"{engine}/") == _files(serial[0])
        staged = sorted(p.name for p in (tmp_path / engine).glob("*.tar"))
        if engine == "ray":         # built and uploaded on the cluster: never in the staging folder
            assert staged == [] and gets.values
            assert all(isinstance(v, BuiltShard) and v.state.in_bucket for v in gets.values)
        else:
            assert staged == sorted(n for n in _files(serial[0]) if n.endswith(".tar"))


class _Stop(Exception):
    pass


def stop_at_first_shard(e) -> None:
    """``on_event`` that stops a run at its first finished shard (``_Stop`` names it)."""
    if e.kind == "shard":
        raise _Stop(e.shard)


def test_ray_to_s3_resumes_keeping_the_shards_built_on_the_cluster(raw, serial3, ray_cluster, s3_server,
                                                                    tmp_path):
    bucket, staging = s3_server.new_bucket(), tmp_path / "stage"
    url = f"s3://{bucket}/ds"

    with pytest.raises(_Stop) as stopped:
        extract("folder", raw, url, _cfg(shard_size=3), engine="ray", max_failures=1.0, staging=staging,
                s3_endpoint=s3_server.endpoint, on_event=stop_at_first_shard)
    first = str(stopped.value)
    assert first in _bucket(s3_server, bucket, "ds/") and not list(staging.glob("*.tar"))
    assert (staging / STATE_DIR / f"{first}.json").is_file()

    events = []
    result = extract("folder", raw, url, _cfg(shard_size=3), engine="ray", max_failures=1.0, staging=staging,
                     s3_endpoint=s3_server.endpoint, on_event=events.append)
    assert result.resumed_shards == 1
    assert ("resumed", first) in {(e.kind, e.shard) for e in events}
    assert not [e for e in events if e.shard == first and e.kind not in ("check", "resumed")]    # not built again
    assert _bucket(s3_server, bucket, "ds/") == serial3
    assert not list(staging.glob("*.tar"))


@pytest.mark.parametrize("first, then", [("local", "ray"), ("ray", "serial")])
def test_s3_run_resumed_under_another_engine(raw, serial3, ray_cluster, s3_server, tmp_path, first, then):
    """A run to s3:// stopped after its first shard and resumed with another engine keeps that
    shard, whether it was written here (and uploaded) or built in the bucket by a Ray task, and
    ends byte-identical to serial; only shards written here are in the staging folder."""
    bucket, staging = s3_server.new_bucket(), tmp_path / "stage"
    url = f"s3://{bucket}/ds"

    with pytest.raises(_Stop) as stopped:
        extract("folder", raw, url, _cfg(shard_size=3), engine=first, workers=2, max_failures=1.0,
                staging=staging, s3_endpoint=s3_server.endpoint, on_event=stop_at_first_shard)
    kept = str(stopped.value)
    events = []
    result = extract("folder", raw, url, _cfg(shard_size=3), engine=then, workers=2, max_failures=1.0,
                     staging=staging, s3_endpoint=s3_server.endpoint, on_event=events.append)
    assert result.resumed_shards == 1 and ("resumed", kept) in {(e.kind, e.shard) for e in events}
    assert not [e for e in events if e.shard == kept and e.kind not in ("check", "resumed")]
    assert _bucket(s3_server, bucket, "ds/") == serial3
    local = {p.name for p in staging.glob("*.tar")}
    built_here = {n for n in serial3 if n.endswith(".tar")} - {kept} if then != "ray" else set()
    assert local == built_here | ({kept} if first != "ray" else set())


def test_a_shard_redone_on_the_cluster_replaces_its_staged_copy(raw, serial3, ray_cluster, s3_server, tmp_path):
    """A shard written here with a clip that failed for an empty file is redone by a Ray task
    once the file is whole: the bucket ends with the new shard, not the stale copy that the
    staging folder held (it is removed there, so the final upload cannot send it over)."""
    import shutil
    src = tmp_path / "raw"
    shutil.copytree(raw, src)
    clip = next(p for p in sorted((src / "alpha").glob("*.mp4")) if p.name != "broken.mp4")
    whole = clip.read_bytes()
    clip.write_bytes(b"")                      # a download not finished yet: retried by a rerun
    bucket, staging = s3_server.new_bucket(), tmp_path / "stage"
    url = f"s3://{bucket}/ds"
    first = extract("folder", src, url, _cfg(shard_size=3), engine="local", workers=2, max_failures=1.0,
                    staging=staging, s3_endpoint=s3_server.endpoint)
    stale = [f for f in first.failures if f["stage"] == "open" and "empty" in f["error"]]
    assert len(stale) == 1 and _bucket(s3_server, bucket, "ds/") != serial3
    clip.write_bytes(whole)
    extract("folder", src, url, _cfg(shard_size=3), engine="ray", max_failures=1.0, staging=staging,
            s3_endpoint=s3_server.endpoint)
    assert _bucket(s3_server, bucket, "ds/") == serial3
    redone = {n for n, data in serial3.items() if n.endswith(".tar") and stale[0]["key"].encode() in data}
    assert len(redone) == 1 and not redone & {p.name for p in staging.glob("*.tar")}


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
