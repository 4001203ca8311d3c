"""avprep.storage: one API over local folders, HTTP and S3 (moto), with retries and resuming."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time

import numpy as np
import pytest

from avprep.errors import ConfigError, StorageError
from avprep.storage import HttpLocation, LocalLocation, Retry, S3Location, open_location
from avprep.upload import upload_folder, upload_order
from tests._servers import FlakyProxy, MotoS3, write_shard_folder

FAST = Retry(tries=8, base_delay=0.2, max_delay=1.0, budget_s=10.0, connect_timeout=2.0, read_timeout=5.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_shard_folder(out, {"train": [3, 2], "val": [2]})
    # one big object so a stream spans many reads and a cut lands mid-object
    (out / "big.bin").write_bytes(np.random.default_rng(1).bytes(3 << 20))
    (out / "README.md").write_text("---\n---\n# a dataset card\n")
    return out


@pytest.fixture(scope="module")
def s3_folder(folder, s3_server):
    bucket = s3_server.new_bucket()
    order = upload_folder(folder, f"s3://{bucket}/ds", s3_endpoint=s3_server.endpoint)
    return bucket, order


@pytest.fixture(scope="module")
def http_folder(folder, http_server):
    shutil.copytree(folder, http_server.root / "ds", dirs_exist_ok=True)
    return f"{http_server.url}/ds"


@pytest.fixture(params=["local", "http", "s3"])
def location(request, folder, s3_server):
    if request.param == "local":
        return open_location(folder, retry=FAST)
    if request.param == "http":
        return open_location(request.getfixturevalue("http_folder"), retry=FAST)
    bucket, _ = request.getfixturevalue("s3_folder")
    return open_location(f"s3://{bucket}/ds", s3_endpoint=s3_server.endpoint, retry=FAST)


def test_open_location_kinds(tmp_path, monkeypatch):
    assert isinstance(open_location(tmp_path), LocalLocation)
    assert isinstance(open_location("http://h:1/p/"), HttpLocation)
    loc = open_location("s3://bkt/some/prefix/", s3_endpoint="http://e:9")
    assert isinstance(loc, S3Location) and loc.url("x.tar") == "s3://bkt/some/prefix/x.tar"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env:1")
    assert open_location("s3://bkt").endpoint == "http://env:1"
    with pytest.raises(ConfigError, match="ftp"):
        open_location("ftp://h/p")
    with pytest.raises(StorageError, match="unsafe"):
        open_location(tmp_path).url("../etc/passwd")


def _kind(name: str) -> str:
    for kind, end in (("shard", ".tar"), ("wids", ".wids.json"), ("index", ".samples.jsonl"),
                      ("manifest", ".manifest.json"), ("card", "README.md"), ("dataset", "dataset.json")):
        if name.endswith(end):
            return kind
    return "other"


def test_upload_sends_shards_first_and_dataset_json_last(folder, s3_folder, s3_server):
    """The documented order: shards, other files, then what names the shards (wids and sample
    indexes, manifests, the card) and dataset.json last."""
    bucket, order = s3_folder
    assert sorted(order) == sorted(p.name for p in folder.iterdir())
    assert [_kind(n) for n in order] == ["shard"] * 3 + ["other"] + ["wids"] * 2 + ["index"] * 2 + [
        "manifest"] * 2 + ["card", "dataset"]
    # the bytes arrived intact
    body = s3_server.client().get_object(Bucket=bucket, Key="ds/train-000000.tar")["Body"].read()
    assert body == (folder / "train-000000.tar").read_bytes()


def test_upload_progress_and_order_helper(tmp_path, s3_server):
    (tmp_path / "a.manifest.json").write_text("{}")
    (tmp_path / "dataset.json").write_text("{}")
    (tmp_path / "z-000000.tar").write_bytes(b"x" * 10)
    (tmp_path / ".hidden").write_text("no")
    (tmp_path / "y-000001.tar.tmp-123").write_text("partial")
    seen = []
    bucket = s3_server.new_bucket()
    upload_folder(tmp_path, f"s3://{bucket}/p", s3_endpoint=s3_server.endpoint,
                  on_progress=lambda done, total, name: seen.append((done, total, name)))
    assert [s[2] for s in seen] == ["z-000000.tar", "a.manifest.json", "dataset.json"]
    assert seen[-1][0] == seen[-1][1] == 14
    assert upload_order(["dataset.json", "README.md", "x.samples.jsonl", "failures.jsonl", "b.tar",
                         "x.manifest.json"]) == [
        "b.tar", "failures.jsonl", "x.samples.jsonl", "x.manifest.json", "README.md", "dataset.json"]
    with pytest.raises(ConfigError):
        upload_folder(tmp_path, str(tmp_path / "elsewhere"))


def test_upload_into_a_missing_bucket_is_one_line_or_creates_it(tmp_path, s3_server):
    (tmp_path / "a-000000.tar").write_bytes(b"x" * 10)
    (tmp_path / "dataset.json").write_text("{}")
    url = f"s3://nobucket-{tmp_path.name[-6:].lower().replace('_', '-')}/p"
    with pytest.raises(ConfigError, match=r"^s3://nobucket-\S+: no such bucket; create it first \(aws s3 mb "
                                          r"s3://nobucket-\S+ --endpoint-url http\S+\) or pass --create-bucket$"):
        upload_folder(tmp_path, url, s3_endpoint=s3_server.endpoint)
    assert upload_folder(tmp_path, url, s3_endpoint=s3_server.endpoint, create_bucket=True) == [
        "a-000000.tar", "dataset.json"]
    assert upload_folder(tmp_path, url, s3_endpoint=s3_server.endpoint, create_bucket=True)   # there now: kept


def test_read_api(location, folder):
    manifest = json.loads(location.read_bytes("train.manifest.json"))
    assert manifest == json.loads((folder / "train.manifest.json").read_text())
    for shard in manifest["shards"]:
        assert location.exists(shard["name"])
        assert location.size(shard["name"]) == shard["bytes"]
        with location.open(shard["name"]) as f:
            digest = hashlib.sha256()
            while chunk := f.read(1000):
                digest.update(chunk)
        assert digest.hexdigest() == shard["sha256"]
    assert location.read_bytes("big.bin") == (folder / "big.bin").read_bytes()
    assert not location.exists("nope.tar")
    assert location.url("val.manifest.json").endswith("/val.manifest.json")


def test_missing_object_fails_fast_naming_url(location, monkeypatch):
    sleeps = []
    monkeypatch.setattr("avprep.storage.time.sleep", sleeps.append)
    url = location.url("missing-000000.tar")
    for call in (location.read_bytes, location.open, location.size):
        with pytest.raises(StorageError) as info:
            call("missing-000000.tar")
        assert url in str(info.value)
    assert sleeps == []  # permanent: no retry


def test_connection_refused_gives_up_within_budget():
    retry = Retry(tries=3, base_delay=0.05, max_delay=0.1, budget_s=5.0, connect_timeout=1.0)
    from tests._servers import free_port

    loc = open_location(f"http://127.0.0.1:{free_port()}/x", retry=retry)
    with pytest.raises(StorageError, match=r"gave up after 3 tries") as info:
        loc.read_bytes("dataset.json")
    assert "127.0.0.1" in str(info.value)


def _read_through_outage(loc, name, expected, proxy, cut_at):
    proxy.fail(after_bytes=cut_at, down_for=0.6)  # armed first: the connection cannot run ahead
    with loc.open(name) as f:
        head = f.read(1000)
        rest = f.read()
    assert proxy.cuts == 1
    assert head + rest == expected


def test_http_stream_resumes_after_server_outage(folder, http_folder, http_server):
    proxy = FlakyProxy(http_server.port)
    proxy.start()
    try:
        loc = open_location(http_folder.replace(http_server.url, proxy.url), retry=FAST)
        n_before = len(http_server.log)
        _read_through_outage(loc, "big.bin", (folder / "big.bin").read_bytes(), proxy, cut_at=200_000)
        ranges = [r for m, p, r in http_server.log[n_before:] if p == "ds/big.bin" and r]
        assert ranges and ranges[0] != "bytes=0-"  # resumed from an offset, not re-read
    finally:
        proxy.close()


def test_s3_stream_resumes_after_server_outage(folder, s3_folder, s3_server):
    bucket, _ = s3_folder
    proxy = FlakyProxy(s3_server.port)
    proxy.start()
    cut_at = 300_000
    try:
        loc = open_location(f"s3://{bucket}/ds", s3_endpoint=proxy.url, retry=FAST)
        _read_through_outage(loc, "big.bin", (folder / "big.bin").read_bytes(), proxy, cut_at=cut_at)
    finally:
        proxy.close()
    gets = [r for m, path, r in proxy.requests if m == "GET" and path.startswith(f"/{bucket}/ds/big.bin")]
    # one GET of the whole object, then ranged GETs resumed from the offset reached: what the
    # client had before the cut (the cut came after cut_at bytes, response headers included; the
    # bytes of the one read that broke are fetched again), never from byte 0. A loaded machine may
    # retry more than once while the server is still down; every retry starts at that offset.
    assert len(gets) >= 2 and gets[0] is None, gets
    starts = {int(re.fullmatch(r"bytes=(\d+)-", g or "").group(1)) for g in gets[1:]}
    assert len(starts) == 1, gets
    assert cut_at - 2 * (1 << 16) < starts.pop() < cut_at, gets


def test_outage_longer_than_budget_raises_not_truncates(folder, http_folder, http_server):
    proxy = FlakyProxy(http_server.port)
    proxy.start()
    retry = Retry(tries=3, base_delay=0.05, max_delay=0.1, budget_s=0.5, connect_timeout=1.0)
    try:
        loc = open_location(http_folder.replace(http_server.url, proxy.url), retry=retry)
        proxy.fail(after_bytes=100_000, down_for=5)
        with loc.open("big.bin") as f:
            f.read(1000)
            with pytest.raises(StorageError, match="big.bin"):
                f.read()
    finally:
        proxy.close()


def test_replaced_object_is_not_spliced(tmp_path, http_server):
    root = http_server.root / "swap"
    root.mkdir()
    (root / "obj.bin").write_bytes(b"a" * 500_000)
    proxy = FlakyProxy(http_server.port)
    proxy.start()
    try:
        loc = open_location(f"{proxy.url}/swap", retry=FAST)
        proxy.fail(after_bytes=100_000, down_for=0.2)
        with loc.open("obj.bin") as f:
            f.read(10)
            (root / "obj.bin").write_bytes(b"b" * 500_001)  # new ETag
            with pytest.raises(StorageError, match="changed"):
                f.read()
    finally:
        proxy.close()


def test_moto_restart_mid_listing(folder, aws_env):
    """A whole S3 server going away and coming back on the same port between reads."""
    server = MotoS3()
    server.start()
    bucket = server.new_bucket()
    upload_folder(folder, f"s3://{bucket}/ds", s3_endpoint=server.endpoint)
    loc = open_location(f"s3://{bucket}/ds", s3_endpoint=server.endpoint, retry=FAST)
    try:
        first = loc.read_bytes("train-000000.tar")
        server.stop()
        threading.Timer(0.8, server.start).start()
        second = loc.read_bytes("train-000001.tar")  # refused, retried, served
        assert first == (folder / "train-000000.tar").read_bytes()
        assert second == (folder / "train-000001.tar").read_bytes()
    finally:
        time.sleep(0.9)
        server.stop()


def test_location_pickles_without_client(s3_server):
    import pickle

    loc = open_location("s3://bkt/p", s3_endpoint=s3_server.endpoint)
    loc.client  # noqa: B018 - create it
    clone = pickle.loads(pickle.dumps(loc))
    assert clone._client is None and clone.url("a") == loc.url("a")
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"


def test_http_5xx_is_retried_and_403_is_not(folder, http_folder, http_server, monkeypatch):
    sleeps = []
    monkeypatch.setattr("avprep.storage.time.sleep", sleeps.append)
    loc = open_location(http_folder, retry=FAST)
    http_server.faults[:] = [503, 500]
    assert json.loads(loc.read_bytes("val.manifest.json"))["num_samples"] == 2
    assert len(sleeps) == 2
    http_server.faults[:] = [503, 403]
    with pytest.raises(StorageError, match=r"403.*val.manifest.json|val.manifest.json.*403"):
        loc.read_bytes("val.manifest.json")
    assert len(sleeps) == 3 and http_server.faults == []


def test_s3_error_classification():
    from botocore.exceptions import ClientError, EndpointConnectionError

    loc = S3Location("b", "p")

    def err(code, status):
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert loc._classify(err("SlowDown", 503)) is True
    assert loc._classify(err("InternalError", 500)) is True
    assert loc._classify(err("NoSuchKey", 404)) is False
    assert loc._classify(err("AccessDenied", 403)) is False
    assert loc._classify(EndpointConnectionError(endpoint_url="http://x")) is True
    assert loc._classify(ValueError("not storage")) is None
