"""Slow and simple HTTP servers (issue 23): a read that stalls mid-body is retried like any other
transient failure, within the default budget's proportions; a server that ignores ``Range``
(the stdlib ``python -m http.server``) serves training, evaluation and verify, each shard read
front to back, with one warning."""
from __future__ import annotations

import dataclasses
import functools
import shutil
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from avprep import shardformat as sf
from avprep.errors import StorageError
from avprep.storage import HttpLocation, Retry
from avprep.verify import verify
from ogmge_train import data

# The default budget's proportions at 1/60 of its times: a 0.5 s read timeout (30 s by default).
SCALE = 60
SCALED = dataclasses.replace(Retry(), **{f: getattr(Retry(), f) / SCALE for f in
                                         ("base_delay", "max_delay", "budget_s", "connect_timeout", "read_timeout")})


@pytest.fixture(scope="module")
def shards(train_shards):
    return train_shards()


@pytest.fixture
def served(http_server, shards, tmp_path):
    name = f"stall-{tmp_path.name}"
    shutil.copytree(shards, http_server.root / name)
    yield f"{http_server.url}/{name}", name
    http_server.stalls.clear()


def _first_shard(shards):
    ds = sf.open_dataset(shards)
    return ds.splits["train"].shards[0].name


def test_a_read_that_stalls_mid_body_is_retried(http_server, served, shards):
    url, _ = served
    shard = _first_shard(shards)
    want = (shards / shard).read_bytes()
    loc = HttpLocation(url, retry=SCALED)
    stall = 2 * SCALED.read_timeout
    http_server.stalls.append((4096, stall))          # headers and 4 KiB, then silence
    assert loc.read_range(shard, 1000, 20000) == want[1000:21000]
    http_server.stalls.append((70000, stall))
    with loc.open(shard) as f:                         # a stream resumes from the byte reached
        assert f.read() == want


def test_a_server_that_never_answers_gives_up_after_retries_within_the_budget(http_server, served, shards):
    url, _ = served
    shard = _first_shard(shards)
    loc = HttpLocation(url, retry=SCALED)
    http_server.stalls.extend([(100, 10 * SCALED.read_timeout)] * 20)
    start = time.monotonic()
    with pytest.raises(StorageError, match=r"gave up after (\d+) tries") as e:
        loc.read_range(shard, 0, 5000)
    tries = int(e.value.args[0].rsplit("gave up after ", 1)[1].split()[0])
    assert tries >= 3                                   # not 1: a stalled read is tried again
    assert time.monotonic() - start < SCALED.budget_s + SCALED.read_timeout + 1


# ---------------------------------------------------------------- a server without Range

class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def stdlib_server(shards):
    """``python -m http.server`` (Python's own handler: no Range support) over the shard folder."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(shards)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("train,workers", [(False, 0), (True, 2)])
def test_the_stdlib_http_server_serves_the_loader_with_one_warning(shards, stdlib_server, train, workers):
    kw = dict(train=train, batch_size=4, frames=1, image_size=8, workers=workers)
    local = list(data.make_loader(shards, "train", **kw))
    warnings: list[str] = []
    remote = list(data.make_loader(stdlib_server, "train", on_warning=warnings.append, **kw))
    assert [b["key"] for b in remote] == [b["key"] for b in local] and len(local) > 2
    assert all(torch.equal(a["audio"], b["audio"]) and torch.equal(a["visual"], b["visual"])
               for a, b in zip(local, remote))
    assert warnings == [f"{stdlib_server}: the server ignores Range requests; shards are read whole, front "
                        "to back, skipping to the samples needed (slower than ranged reads)"]


def test_the_stdlib_http_server_serves_verify_and_a_resumed_stream(shards, stdlib_server):
    assert verify(stdlib_server).ok
    shard = _first_shard(shards)
    loc = HttpLocation(stdlib_server, retry=SCALED)
    want = (shards / shard).read_bytes()
    # reads forward within one response, and backwards with a new one
    assert loc.read_range(shard, 5000, 100) == want[5000:5100]
    assert loc.read_range(shard, 9000, 100) == want[9000:9100]
    assert loc.read_range(shard, 10, 100) == want[10:110]


def test_a_broken_stream_from_a_server_without_range_resumes_by_skipping(http_server, served, shards):
    url, _ = served
    shard = _first_shard(shards)
    want = (shards / shard).read_bytes()
    http_server.ranges = False
    try:
        http_server.stalls.append((50000, 2 * SCALED.read_timeout))
        with HttpLocation(url, retry=SCALED).open(shard) as f:
            assert f.read() == want
    finally:
        http_server.ranges = True


def test_training_from_the_stdlib_http_server_warns_once(shards, stdlib_server, tmp_path, one_torch_thread):
    from ogmge_train import train as train_mod
    from ogmge_train.config import resolve

    events: list[dict] = []
    cfg = resolve("demo", shards=stdlib_server, out=str(tmp_path / "run"), epochs=2, batch_size=8, image_size=32,
                  workers=0, device="cpu")
    summary = train_mod.train(cfg, on_event=events.append)
    assert summary["epochs"] == 2
    assert [e["message"] for e in events if e["event"] == "warning"] == [
        f"{stdlib_server}: the server ignores Range requests; shards are read whole, front to back, skipping to "
        "the samples needed (slower than ranged reads)"]
