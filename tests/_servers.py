"""Test servers on 127.0.0.1: a moto S3 server, a static HTTP server with Range support, and a
TCP proxy that can drop connections mid-stream and refuse new ones for a while (a server that
goes down and comes back on the same port).

The fixtures are registered in tests/conftest.py: request ``s3_server``, ``http_server`` or
``aws_env`` by name. Both servers are session-wide; tests use
their own bucket / sub-folder.
"""
from __future__ import annotations

import os
import re
import socket
import struct
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- moto ----------------------------------------------------------------------------------------
class MotoS3:
    """A moto S3 server that can be stopped and restarted on the same port (state survives:
    moto keeps it in-process)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self._server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self):
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def new_bucket(self) -> str:
        name = f"b-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def aws_env():
    old = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    yield AWS_ENV
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_server(aws_env):
    server = MotoS3()
    server.start()
    yield server
    server.stop()


# -- static HTTP with Range ----------------------------------------------------------------------
class _RangeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool):
        rel = unquote(urlparse(self.path).path).lstrip("/")
        path = (self.server.root / rel).resolve()
        self.server.log.append((self.command, rel, self.headers.get("Range")))
        if self.server.faults:
            return self._status(self.server.faults.pop(0))
        action = self.server.take_action(rel)
        if action.isdigit():
            return self._status(int(action))
        kind, _, seconds = action.partition(":")
        if kind in ("slow", "stall"):        # stall: silent longer than the client waits
            time.sleep(float(seconds))
        if self.server.root.resolve() not in path.parents or not path.is_file():
            return self._status(404)
        st = path.stat()
        size, etag = st.st_size, f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
        start, end, status = 0, size - 1, 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if m and self.server.files.ranges:
            if self.headers.get("If-Match") not in (None, etag):
                return self._status(412)
            start, end, status = int(m[1]), min(int(m[2] or size - 1), size - 1), 206
            if start >= size:
                return self._status(416)
        self.send_response(status)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if body:
            stall = self.server.files.stalls.pop(0) if self.server.files.stalls else None
            with open(path, "rb") as f:
                f.seek(start)
                left = end - start + 1
                if kind == "truncate":       # the announced length, half of it sent, then closed
                    left = left // 2
                    self.close_connection = True
                while left > 0:
                    chunk = f.read(min(65536, left if stall is None else min(left, stall[0])))
                    self.wfile.write(chunk)
                    left -= len(chunk)
                    if stall is not None:      # stop sending mid-body, then hang up
                        self.wfile.flush()
                        time.sleep(stall[1])
                        self.close_connection = True
                        return

    def _status(self, code: int):
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    rules: dict

    def take_action(self, rel: str) -> str:
        with self.rules_lock:
            actions = self.rules.get(rel)
            if not actions:
                return "serve"
            return actions.pop(0) if len(actions) > 1 else actions[0]

    def handle_error(self, request, client_address):
        pass        # clients that hang up early (ffmpeg, yt-dlp probing a file) are not errors here


class FileServer:
    """Serves ``root`` over HTTP/1.1 with Range and ETag; ``log`` records (method, path, range).
    Status codes appended to ``faults`` are answered (one per request) before serving again;
    ``(after_bytes, seconds)`` appended to ``stalls`` makes the next body stop after that many
    bytes, stay silent that long and hang up; ``ranges = False`` ignores Range headers (200,
    the whole file), as servers without Range support do.
    ``rules[path]`` is a list of actions for requests of that path, each taken in turn, the last
    one kept: a status code ("404"), "serve", "slow:<s>" / "stall:<s>" (wait that long first),
    "truncate" (announce the length, send half, close)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.port = free_port()
        self.log: list = []
        self.faults: list[int] = []
        self.rules: dict[str, list[str]] = {}
        self.stalls: list[tuple[int, float]] = []
        self.ranges = True
        self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        self._server = _HTTPServer(("127.0.0.1", self.port), _RangeHandler)
        self._server.root, self._server.log, self._server.faults = self.root, self.log, self.faults
        self._server.rules, self._server.rules_lock = self.rules, threading.Lock()
        self._server.files = self
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture(scope="session")
def http_server(tmp_path_factory):
    server = FileServer(tmp_path_factory.mktemp("http-root"))
    server.start()
    yield server
    server.stop()


# -- a proxy that can go down --------------------------------------------------------------------
class FlakyProxy:
    """TCP proxy to ``target_port``. ``fail(after_bytes, down_for)`` arms one fault: the next
    connection that has forwarded ``after_bytes`` response bytes is ended there (the client sees
    a response shorter than announced), every other connection is reset, and the proxy refuses
    connections for ``down_for`` seconds before listening again on the same port."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self.cuts = 0
        self.requests: list[tuple[str, str, str | None]] = []     # (method, path, Range header) seen going up
        self._armed: tuple[int, float] | None = None
        self._closed = False
        self._listener = None
        self._conns: set = set()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(16)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def stop(self):
        """Stop listening and reset every open connection."""
        if self._listener is not None:
            _reset(self._listener)  # shutdown() wakes the thread blocked in accept()
            self._listener = None
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            _reset(c)

    def fail(self, after_bytes: int, down_for: float):
        self._armed = (after_bytes, down_for)

    def close(self):
        """Stop for good (a pending restart is cancelled)."""
        self._closed = True
        self.stop()

    def _restart(self):
        if not self._closed:
            self.start()

    def _take_fault(self):
        with self._lock:
            armed, self._armed = self._armed, None
            return armed

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src, dst, downstream: bool):
        sent, cut = 0, False
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not downstream:
                    self.requests += _request_heads(data)
                armed = self._armed if downstream else None
                if armed and sent + len(data) >= armed[0] and self._take_fault():
                    # end the response early with a clean FIN (nothing the client got is lost),
                    # then go down: refuse connections until the restart
                    with self._lock:
                        self._conns.difference_update((src, dst))
                    dst.sendall(data[: max(0, armed[0] - sent)])
                    dst.shutdown(socket.SHUT_WR)
                    self.cuts += 1
                    self.stop()
                    threading.Timer(armed[1], self._restart).start()
                    src.close()
                    cut = True
                    return
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            if not cut:
                _reset(src)
                _reset(dst)


_REQUEST_HEAD = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/1\.[01]\r\n(.*?)\r\n\r\n", re.S)


def _request_heads(data: bytes) -> list[tuple[str, str, str | None]]:
    """(method, path, Range header or None) of each HTTP request head in ``data``."""
    out = []
    for m in _REQUEST_HEAD.finditer(data):
        ranges = re.findall(rb"(?im)^range:\s*(\S+)", m.group(3))
        out.append((m.group(1).decode(), m.group(2).decode(), ranges[0].decode() if ranges else None))
    return out


def _reset(sock):
    """Abort a socket even while another thread is blocked on it (close() alone would not)."""
    for step in (lambda: sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)),
                 lambda: sock.shutdown(socket.SHUT_RDWR), sock.close):
        try:
            step()
        except OSError:
            pass


# -- a small shard folder in the SPEC §4 layout --------------------------------------------------
def write_shard_folder(out: Path, shards: dict[str, list[int]], *, classes=("a", "b", "c"), n_frames=4,
                       spec_shape=(8, 12), frame_wh=(40, 30), seed=0) -> dict[str, list[str]]:
    """Writes ``<split>-NNNNNN.tar`` shards with ``shards[split][i]`` samples each, plus
    ``<split>.manifest.json``, ``<split>.samples.jsonl`` and ``dataset.json``.

    Frame j of every clip is a flat grey image of value ``20 * j + 10`` (so a test can tell
    which frames a loader picked); the spectrogram is seeded float16 noise. Returns the keys
    per split in order.
    """
    import io
    import json

    import numpy as np
    from PIL import Image

    from avprep import shardformat as sf
    from avprep.shards import ShardWriter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    jpgs = []
    for j in range(n_frames):
        buf = io.BytesIO()
        Image.new("RGB", frame_wh, (20 * j + 10,) * 3).save(buf, format="JPEG", quality=95)
        jpgs.append(buf.getvalue())
    keys: dict[str, list[str]] = {}
    manifests = {}
    for split, counts in shards.items():
        entries, records, n = [], [], 0
        keys[split] = []
        for s, count in enumerate(counts):
            name = sf.shard_name(split, s)
            with ShardWriter(out / name) as writer:
                for _ in range(count):
                    key, label = f"{split}_{n:05d}", n % len(classes)
                    spec = rng.standard_normal(spec_shape).astype(np.float16)
                    npy = io.BytesIO()
                    np.save(npy, spec)
                    meta = {"key": key, "label": classes[label], "label_index": label, "split": split,
                            "n_frames": n_frames, "spec_shape": list(spec_shape)}
                    span = writer.add(key, sf.ordered_members(str(label).encode(), json.dumps(meta).encode(),
                                                              npy.getvalue(), jpgs))
                    records.append({"key": key, "label": classes[label], "label_index": label, "shard": name,
                                    "source": f"{key}.mp4", "duration": float(n_frames), "n_frames": n_frames,
                                    **span})
                    keys[split].append(key)
                    n += 1
                w = writer.commit()
            entries.append(sf.ShardEntry(name, count, w.bytes, w.sha256))
        manifests[split] = sf.write_split_files(out, split, sf.SampleIndex.from_records(split, records), entries,
                                                list(classes), lambda p, b: p.write_bytes(b))
    dataset = {"name": "synthetic", "classes": list(classes), "splits": {s: sum(c) for s, c in shards.items()},
               "config": {"fps": 1, "frame_size": min(frame_wh), "spec_dtype": "float16"}, "version": "test",
               "spec_shape": list(spec_shape), "spec_dtype": "float16", **sf.frame_stats([n_frames])}
    (out / "dataset.json").write_text(json.dumps(dataset, indent=1))
    return keys
