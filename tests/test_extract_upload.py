"""Extraction to s3:// (moto): each shard is uploaded by the run as soon as it is committed, the
indexes, manifests and dataset.json after every shard; the bucket ends byte-identical to a local
extraction; a rerun sends only what the bucket lacks; an upload failure stops the run with one
line naming the URL and leaves the staging folder ready for a rerun.

Uploads are logged by wrapping ``S3Location.put_file`` (the one place that sends a file), with
a start and an end entry per file, so the tests assert on the order the uploader really used,
not on object timestamps.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from avprep import synth
from avprep.config import ExtractConfig, spec_preset
from avprep.errors import StorageError
from avprep.extract import extract
from avprep.outdir import STATE_DIR
from avprep.storage import S3Location, open_location
from avprep.upload import ShardUploader

N_CLIPS = 12


def _cfg() -> ExtractConfig:
    return ExtractConfig(spec=spec_preset("paper", "folder", duration=2.0), frame_size=32, shard_size=2)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return synth.make_dataset("folder", tmp_path_factory.mktemp("up") / "raw", N_CLIPS, num_classes=2,
                              duration=2.0, fps=5, size=(64, 48))


@pytest.fixture(scope="module")
def local(raw, tmp_path_factory) -> dict[str, bytes]:
    """The reference: the same extraction into a local folder. No uploader thread runs for it."""
    out = tmp_path_factory.mktemp("local")
    threads = set()
    extract("folder", raw, out, _cfg(), workers=1,
            on_event=lambda e: threads.update(t.name for t in threading.enumerate()))
    assert not any(name.startswith("avprep-upload") for name in threads)
    files = _files(out)
    assert sum(n.endswith(".tar") for n in files) >= 4
    return files


class UploadLog:
    """Wraps ``S3Location.put_file``: ("start"|"end", name) entries in the order they happen."""

    def __init__(self, monkeypatch):
        self.entries: list[tuple[str, str]] = []
        self.changed = threading.Condition()
        real = S3Location.put_file

        def put_file(loc, name, path):
            self._add("start", name)
            real(loc, name, path)
            self._add("end", name)

        monkeypatch.setattr(S3Location, "put_file", put_file)

    def _add(self, what: str, name: str) -> None:
        with self.changed:
            self.entries.append((what, name))
            self.changed.notify_all()

    def names(self, what: str = "end") -> list[str]:
        return [n for w, n in self.entries if w == what]

    def wait_for(self, name: str, timeout: float = 30.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: name in self.names(), timeout)


def _objects(s3_server, bucket: str, prefix: str) -> dict[str, bytes]:
    client = s3_server.client()
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"][len(prefix):]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            for o in listing}


def _keys(s3_server, bucket: str, prefix: str) -> set[str]:
    listing = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"][len(prefix):] for o in listing}


def _extract(raw, url, staging, s3_server, **kw):
    return extract("folder", raw, url, _cfg(), workers=1, staging=staging, s3_endpoint=s3_server.endpoint, **kw)


def test_each_shard_is_in_the_bucket_before_the_run_ends(raw, local, s3_server, tmp_path, monkeypatch):
    log = UploadLog(monkeypatch)
    bucket = s3_server.new_bucket()
    shards = sorted(n for n in local if n.endswith(".tar"))
    seen: list[tuple[str, set[str]]] = []

    def on_event(e):
        if e.kind == "shard" and e.shard != shards[0]:
            # the shard committed before this one is uploaded while the run goes on: waiting
            # here blocks the run, so a run that uploaded only at its end would never get there
            previous = shards[shards.index(e.shard) - 1]
            assert log.wait_for(previous), f"{previous} not uploaded while the run went on"
            seen.append((e.shard, _keys(s3_server, bucket, "ds/")))

    result = _extract(raw, f"s3://{bucket}/ds", tmp_path / "stage", s3_server, on_event=on_event)
    assert result.out == f"s3://{bucket}/ds" and result.num_shards == len(shards)
    assert len(seen) == len(shards) - 1
    for shard, keys in seen:
        earlier = set(shards[:shards.index(shard)])
        assert earlier <= keys and all(k.endswith(".tar") for k in keys)   # nothing but shards yet

    # order: every shard finished before any other file starts; dataset.json last
    starts, ends = log.names("start"), log.names("end")
    assert sorted(starts) == sorted(local) and sorted(ends) == sorted(local)    # each file once
    last_shard_end = max(i for i, (w, n) in enumerate(log.entries) if w == "end" and n.endswith(".tar"))
    first_other_start = min(i for i, (w, n) in enumerate(log.entries) if w == "start" and not n.endswith(".tar"))
    assert last_shard_end < first_other_start
    assert ends[-1] == "dataset.json" and log.entries[-1] == ("end", "dataset.json")
    # then what names the shards, in upload_order: wids and sample indexes, manifests, the card
    kinds = ["failures.jsonl", ".wids.json", ".samples.jsonl", ".manifest.json", "README.md", "dataset.json"]
    rest = [next(i for i, k in enumerate(kinds) if n.endswith(k)) for n in ends if not n.endswith(".tar")]
    assert rest == sorted(rest) and set(rest) == set(range(len(kinds)))

    # the bucket holds exactly the local extraction's files, byte for byte (no resume state)
    assert _objects(s3_server, bucket, "ds/") == local
    assert not any(STATE_DIR in k for k in _keys(s3_server, bucket, ""))
    assert not any(t.name.startswith("avprep-upload") for t in threading.enumerate())


class _Stop(Exception):
    pass


def test_rerun_after_interruption_uploads_only_what_the_bucket_lacks(raw, local, s3_server, tmp_path,
                                                                      monkeypatch):
    log = UploadLog(monkeypatch)
    bucket, staging = s3_server.new_bucket(), tmp_path / "stage"
    shards = sorted(n for n in local if n.endswith(".tar"))

    def stop_at_second_shard(e):
        if e.kind == "shard" and e.shard == shards[1]:
            assert log.wait_for(shards[0])
            raise _Stop

    with pytest.raises(_Stop):
        _extract(raw, f"s3://{bucket}/ds", staging, s3_server, on_event=stop_at_second_shard)
    there = _keys(s3_server, bucket, "ds/")
    assert shards[0] in there and there <= set(shards[:2])     # no manifest, no later shard
    assert (staging / shards[1]).is_file()                      # committed: kept for the rerun

    log.entries.clear()
    result = _extract(raw, f"s3://{bucket}/ds", staging, s3_server)
    assert result.resumed_shards == 2
    uploaded = log.names()
    assert not set(uploaded) & there                            # intact remote copies not sent again
    assert set(uploaded) == set(local) - there and uploaded[-1] == "dataset.json"
    assert _objects(s3_server, bucket, "ds/") == local


def test_rerun_replaces_missing_and_different_remote_shards(raw, local, s3_server, tmp_path, monkeypatch):
    log = UploadLog(monkeypatch)
    bucket, staging = s3_server.new_bucket(), tmp_path / "stage"
    _extract(raw, f"s3://{bucket}/ds", staging, s3_server)
    shards = sorted(n for n in local if n.endswith(".tar"))
    client = s3_server.client()
    client.delete_object(Bucket=bucket, Key=f"ds/{shards[0]}")
    client.put_object(Bucket=bucket, Key=f"ds/{shards[1]}", Body=b"truncated")

    log.entries.clear()
    result = _extract(raw, f"s3://{bucket}/ds", staging, s3_server)
    assert result.resumed_shards == len(shards)                 # nothing extracted again
    sent = [n for n in log.names() if n.endswith(".tar")]
    assert sorted(sent) == shards[:2]
    assert _objects(s3_server, bucket, "ds/") == local


def test_upload_failure_is_one_line_and_the_rerun_completes(raw, local, s3_server, tmp_path):
    bucket, staging = s3_server.new_bucket(), tmp_path / "stage"
    gone = []

    def drop_bucket(e):     # there when the run starts (it checks), gone before the first upload
        if not gone:
            s3_server.client().delete_bucket(Bucket=bucket)
            gone.append(e)

    with pytest.raises(StorageError) as err:
        _extract(raw, f"s3://{bucket}/ds", staging, s3_server, on_event=drop_bucket)
    message = str(err.value)
    assert message.startswith(f"s3://{bucket}/ds/") and ".tar: " in message and "\n" not in message
    assert "NoSuchBucket" in message
    kept = sorted(p.name for p in staging.glob("*.tar"))
    assert kept and all((staging / STATE_DIR / f"{n}.json").is_file() for n in kept)
    assert not (staging / "dataset.json").exists()

    s3_server.client().create_bucket(Bucket=bucket)
    try:
        result = _extract(raw, f"s3://{bucket}/ds", staging, s3_server)
        assert result.resumed_shards == len(kept)
        assert _objects(s3_server, bucket, "ds/") == local
    finally:
        client = s3_server.client()
        for key in _keys(s3_server, bucket, ""):
            client.delete_object(Bucket=bucket, Key=key)
        client.delete_bucket(Bucket=bucket)


def test_uploader_bounds_pending_uploads_and_sends_the_rest_last(tmp_path, s3_server, monkeypatch):
    names = [f"train-{i:06d}.tar" for i in range(6)]
    for n in [*names, "train.wids.json", "train.manifest.json", "train.samples.jsonl", "dataset.json"]:
        (tmp_path / n).write_bytes(n.encode())
    (tmp_path / STATE_DIR).mkdir()
    (tmp_path / STATE_DIR / "options.json").write_bytes(b"{}")
    bucket = s3_server.new_bucket()
    loc = open_location(f"s3://{bucket}/p", s3_endpoint=s3_server.endpoint)
    assert isinstance(loc, S3Location)
    running, most = [0], [0]
    lock = threading.Lock()
    real = S3Location.put_file

    def slow_put(self, name, path):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.1)
        real(self, name, path)
        with lock:
            running[0] -= 1

    monkeypatch.setattr(S3Location, "put_file", slow_put)
    with ShardUploader(loc, tmp_path, threads=4, max_pending=2) as up:
        for n in names:
            up.submit(n)
        order = up.finish()
    assert most[0] == 2
    assert sorted(order[:6]) == names
    assert order[6:] == ["train.wids.json", "train.samples.jsonl", "train.manifest.json", "dataset.json"]
    assert _keys(s3_server, bucket, "p/") == set(order)


def test_uploader_skips_a_present_object_of_the_same_size(tmp_path, s3_server):
    (tmp_path / "a.tar").write_bytes(b"abcd")
    (tmp_path / "b.tar").write_bytes(b"efgh")
    bucket = s3_server.new_bucket()
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="p/a.tar", Body=b"abcd")
    client.put_object(Bucket=bucket, Key="p/b.tar", Body=b"ef")
    loc = open_location(f"s3://{bucket}/p", s3_endpoint=s3_server.endpoint)
    assert isinstance(loc, S3Location)
    with ShardUploader(loc, tmp_path) as up:
        up.submit("a.tar", unless_present=True)
        up.submit("b.tar", unless_present=True)
        assert up.finish() == ["b.tar"]
    assert _objects(s3_server, bucket, "p/") == {"a.tar": b"abcd", "b.tar": b"efgh"}


def test_a_shard_only_in_the_bucket_is_kept_while_the_bucket_holds_its_size(tmp_path, s3_server):
    """A shard built and uploaded on a cluster node has a state but no staged file."""
    from avprep.datasets._base import Clip
    from avprep.outdir import ShardState, finished_state, save_state
    from avprep.shards import ShardPlan
    plan = ShardPlan("train-000000.tar", "train", (Clip("a", "x", "train", Path("a.mp4")),))
    (tmp_path / STATE_DIR).mkdir()
    st = ShardState(plan.name, "train", ["a"], "0" * 64, 4, 1, in_bucket=True)
    save_state(tmp_path, st)
    bucket = s3_server.new_bucket()
    loc = open_location(f"s3://{bucket}/p", s3_endpoint=s3_server.endpoint)
    assert isinstance(loc, S3Location)
    assert finished_state(tmp_path, plan, loc) is None                  # not there
    s3_server.client().put_object(Bucket=bucket, Key=f"p/{plan.name}", Body=b"ab")
    assert finished_state(tmp_path, plan, loc) is None                  # of another size
    s3_server.client().put_object(Bucket=bucket, Key=f"p/{plan.name}", Body=b"abcd")
    assert finished_state(tmp_path, plan, loc) == st
    assert finished_state(tmp_path, plan) is None                       # no bucket to ask
