"""Shard locations: a local folder, an ``http(s)://`` prefix or an ``s3://bucket/prefix``.

One small API for all three (``Location``): ``url``, ``read_bytes``, ``read_range``, ``open``,
``exists``, ``size``. Remote reads retry transient failures (connection refused or reset,
timeouts, HTTP 5xx/429, S3 throttling) with exponential backoff inside a bounded budget
(``Retry``: 5 tries within 2 minutes by default, a stalled read counted as one try);
permanent failures (404, 403, NoSuchKey,
missing credentials) raise ``StorageError`` naming the URL at once. ``S3Location.put_file``
uploads one file with the same retries (``avprep.upload`` sends whole folders, in order).

``open`` streams: a shard is never buffered whole in memory. When a stream breaks mid-read it
resumes with a ranged request from the byte offset reached (HTTP ``Range`` / S3 ``Range``,
pinned to the object's ETag so a replaced object is never spliced), and a stream that ends
before its announced length is treated as broken, not as the end: a reader either gets every
byte or a ``StorageError``.

S3 uses boto3 with botocore's own retries switched off (ours govern). The endpoint comes from the
``s3_endpoint`` argument, else ``AWS_ENDPOINT_URL``; credentials and region from the standard AWS
environment/config (region defaults to us-east-1 for S3-compatible servers). Clients and HTTP
sessions are created lazily per process, so a Location can be pickled into DataLoader workers.
"""
from __future__ import annotations

import io
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from .errors import ConfigError, StorageError

_CHUNK = 1 << 20
_READ = 1 << 16


@dataclass(frozen=True)
class Retry:
    """Retry budget for transient errors: at most ``tries`` attempts, none started more than
    ``budget_s`` seconds after the failure episode began (the attempts' own time counts; a
    stream that makes progress again starts a fresh episode). A read that stalls for
    ``read_timeout`` is a transient failure like any other, so the budget holds several of
    them: by default a stalled response is tried again up to 3 times within 2 minutes."""

    tries: int = 5
    base_delay: float = 0.5
    max_delay: float = 8.0
    budget_s: float = 120.0
    connect_timeout: float = 5.0
    read_timeout: float = 30.0

    def delay(self, attempt: int) -> float:
        # jitter so that many DataLoader workers do not retry in lockstep
        return min(self.max_delay, self.base_delay * 2**attempt) * random.uniform(0.5, 1.0)


class _Transient(Exception):
    """Internal: a failure worth retrying (wraps the cause)."""


def _check_name(name: str) -> str:
    """Names come from manifests, which are untrusted: refuse anything leaving the prefix, as
    written and after percent-decoding (a server decodes ``%2e%2e`` to ``..``), and anything a
    URL or key would carry differently (``%``, ``?``, ``#``, control characters)."""
    bad = not isinstance(name, str) or not name
    if not bad:
        decoded = unquote(name)
        bad = (any(c in name for c in "%?#\\") or any(ord(c) < 32 or ord(c) == 127 for c in decoded)
               or any(PurePosixPath(t).is_absolute() or ".." in PurePosixPath(t).parts for t in (name, decoded)))
    if bad:
        raise StorageError(f"refusing unsafe object name {name!r}")
    return str(PurePosixPath(name))


class Location:
    """A folder of shards somewhere. Subclasses implement ``_open_at``/``_stat``/``_read``.
    ``notes`` collects what a reader should be told once (e.g. a server without Range support);
    whoever reads the location drains it."""

    retry: Retry
    notes: list[str]

    def url(self, name: str) -> str:
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        """The whole object (small files: manifests, dataset.json)."""
        return self._with_retry(self.url(name), lambda: self._read(name))

    def open(self, name: str) -> io.BufferedIOBase:
        """A streaming binary reader that resumes at the reached offset after transient breaks."""
        _check_name(name)
        return io.BufferedReader(_ResumingStream(self, name), buffer_size=_CHUNK)

    def read_range(self, name: str, start: int, length: int) -> bytearray:
        """Bytes [start, start + length) of an object in one request (HTTP/S3 ``Range``), with the
        same retries as ``open``; fewer bytes than asked is an error (the object is shorter than
        its index says)."""
        _check_name(name)
        if length <= 0:
            return bytearray()

        def fetch():
            data = self._read_range(name, start, length)
            if len(data) != length:
                raise StorageError(f"{self.url(name)}: bytes {start}-{start + length - 1} asked, "
                                   f"{len(data)} returned (shorter than its index says)")
            return data if isinstance(data, bytearray) else bytearray(data)

        return self._with_retry(self.url(name), fetch)

    def exists(self, name: str) -> bool:
        return self._with_retry(self.url(name), lambda: self._stat(name)) is not None

    def size(self, name: str) -> int:
        size = self.present_size(name)
        if size is None:
            raise StorageError(f"{self.url(name)}: not found")
        return size

    def present_size(self, name: str) -> int | None:
        """The object's size, or None when there is none (one HEAD, retried)."""
        st = self._with_retry(self.url(name), lambda: self._stat(name))
        return None if st is None else st[0]

    # -- implemented by subclasses -------------------------------------------------------------
    def _read(self, name: str) -> bytes:
        """Whole object; raises _Transient, StorageError, or a classifiable library error."""
        raise NotImplementedError

    def _stat(self, name: str) -> tuple[int, str | None] | None:
        """(size, etag) or None when the object does not exist."""
        raise NotImplementedError

    def _read_range(self, name: str, start: int, length: int) -> bytes | bytearray:
        raise NotImplementedError

    def _open_at(self, name: str, offset: int, etag: str | None):
        """(raw stream with .read(n), total size or None, etag) starting at ``offset``."""
        raise NotImplementedError

    def _classify(self, exc: BaseException) -> bool | None:
        """True: transient; False: permanent; None: not a storage error (re-raise as is)."""
        return None

    def _with_retry(self, url: str, fn: Callable, episode_start: float | None = None):
        attempt, start = 0, time.monotonic() if episode_start is None else episode_start
        while True:
            try:
                return fn()
            except StorageError:
                raise
            except Exception as e:  # noqa: BLE001 - classified below
                transient = isinstance(e, _Transient) or self._classify(e)
                if transient is None:
                    raise
                reason = _reason(e)
                if not transient:
                    raise StorageError(f"{url}: {reason}") from e
                attempt += 1
                wait = self.retry.delay(attempt - 1)
                if attempt >= self.retry.tries or time.monotonic() - start + wait > self.retry.budget_s:
                    raise StorageError(f"{url}: {reason} (gave up after {attempt} tries)") from e
                time.sleep(wait)


def _reason(e: BaseException) -> str:
    if isinstance(e, _Transient):
        return str(e)
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class _ResumingStream(io.RawIOBase):
    """Raw reader over a remote object that reopens at the current offset after a break.

    Premature EOF (fewer bytes than the announced length) counts as a break. If the length is
    unknown (a server without Content-Length), EOF has to be trusted.
    """

    def __init__(self, location: Location, name: str):
        self._loc, self._name, self._url = location, name, location.url(name)
        self._pos, self._raw, self._total, self._etag = 0, None, None, None
        self._reopen(time.monotonic())

    def readable(self) -> bool:
        return True

    def _reopen(self, episode_start: float):
        self._close_raw()
        self._raw, total, etag = self._loc._with_retry(
            self._url, lambda: self._loc._open_at(self._name, self._pos, self._etag), episode_start)
        if self._total is not None and total is not None and total != self._total:
            raise StorageError(f"{self._url}: object changed while it was being read "
                               f"({self._total} bytes, now {total})")
        self._total = self._total if self._total is not None else total
        self._etag = self._etag or etag

    def readinto(self, buf) -> int:
        if self._total is not None and self._pos >= self._total:
            return 0
        episode_start, breaks = None, 0
        while True:
            try:
                n = _read_into(self._raw, buf)
                if n == 0 and self._total is not None and self._pos < self._total:
                    raise _Transient(f"stream ended at byte {self._pos} of {self._total}")
                self._pos += n
                return n
            except Exception as e:  # noqa: BLE001
                transient = isinstance(e, _Transient) or self._loc._classify(e)
                if transient is None:
                    raise
                if not transient:
                    raise StorageError(f"{self._url}: {_reason(e)}") from e
                episode_start = episode_start or time.monotonic()
                breaks += 1
                retry = self._loc.retry
                if breaks >= retry.tries or time.monotonic() - episode_start > retry.budget_s:
                    raise StorageError(f"{self._url}: {_reason(e)} at byte {self._pos} "
                                       f"(gave up after {breaks} tries)") from e
                time.sleep(retry.delay(breaks - 1))
                self._reopen(episode_start)

    def _close_raw(self):
        if self._raw is not None:
            try:
                self._raw.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close
                pass
            self._raw = None

    def close(self):
        self._close_raw()
        super().close()


def _read_into(raw, buf) -> int:
    # small reads: the bytes of a read that breaks are lost, so this bounds what a resume re-fetches
    data = raw.read(min(len(buf), _READ))
    buf[: len(data)] = data
    return len(data)


# -- local ---------------------------------------------------------------------------------------
class LocalLocation(Location):
    """A folder on this machine (no retries: local errors are not transient)."""

    def __init__(self, root: str | os.PathLike, retry: Retry | None = None):
        self.root = Path(root)
        self.retry = retry or Retry()
        self.notes = []

    def url(self, name: str) -> str:
        return str(self.root / _check_name(name))

    def read_bytes(self, name: str) -> bytes:
        try:
            return Path(self.url(name)).read_bytes()
        except OSError as e:
            raise StorageError(f"{self.url(name)}: {e.strerror or e}") from None

    def open(self, name: str) -> io.BufferedIOBase:
        try:
            return open(self.url(name), "rb")
        except OSError as e:
            raise StorageError(f"{self.url(name)}: {e.strerror or e}") from None

    def read_range(self, name: str, start: int, length: int) -> bytearray:
        data = bytearray(max(length, 0))
        try:
            with open(self.url(name), "rb", buffering=0) as f:
                f.seek(start)
                got = f.readinto(data) if length > 0 else 0
        except OSError as e:
            raise StorageError(f"{self.url(name)}: {e.strerror or e}") from None
        if got != len(data):
            raise StorageError(f"{self.url(name)}: bytes {start}-{start + length - 1} asked, {got} there "
                               "(shorter than its index says)")
        return data

    def exists(self, name: str) -> bool:
        return Path(self.url(name)).is_file()

    def size(self, name: str) -> int:
        try:
            return Path(self.url(name)).stat().st_size
        except OSError as e:
            raise StorageError(f"{self.url(name)}: {e.strerror or e}") from None

    def present_size(self, name: str) -> int | None:
        path = Path(self.url(name))
        return path.stat().st_size if path.is_file() else None


# -- http(s) -------------------------------------------------------------------------------------
class HttpLocation(Location):
    """``http(s)://host/prefix``: GET with Range for resuming, HEAD for exists/size."""

    def __init__(self, prefix: str, retry: Retry | None = None):
        self.prefix = prefix.rstrip("/")
        self.retry = retry or Retry()
        self.notes = []
        self._session, self._pid = None, None
        self._whole: dict[str, _Sequential] = {}     # open whole-object responses, by shard
        self._no_range: set[str] = set()              # shards whose server ignored Range

    def __getstate__(self):
        return {**self.__dict__, "_session": None, "_pid": None, "_whole": {}}

    @property
    def session(self):
        if self._session is None or self._pid != os.getpid():
            import requests

            self._session, self._pid = requests.Session(), os.getpid()
        return self._session

    def url(self, name: str) -> str:
        return f"{self.prefix}/{_check_name(name)}"

    def _timeouts(self):
        return (self.retry.connect_timeout, self.retry.read_timeout)

    def _read(self, name: str) -> bytes:
        r = self.session.get(self.url(name), timeout=self._timeouts())
        r.raise_for_status()
        return r.content

    def _read_range(self, name: str, start: int, length: int) -> bytes | bytearray:
        """One ranged GET. A server that answers it with the whole object (200: no Range support,
        as ``python -m http.server``) is told once per shard: that response, and later ones when
        a read goes backwards, are read front to back, skipping to each range asked for."""
        whole = self._whole.pop(name, None)
        try:
            if whole is None or start < whole.pos:
                headers = {"Accept-Encoding": "identity"}
                if whole is None and name not in self._no_range:
                    headers["Range"] = f"bytes={start}-{start + length - 1}"
                r = self.session.get(self.url(name), timeout=self._timeouts(), headers=headers, stream=True)
                if r.status_code >= 400:
                    r.close()
                    r.raise_for_status()
                if r.status_code == 206:
                    return r.content
                if name not in self._no_range:
                    self._no_range.add(name)
                    note = (f"{self.prefix}: the server ignores Range requests; shards are read whole, front "
                            "to back, skipping to the samples needed (slower than ranged reads)")
                    if note not in self.notes:
                        self.notes.append(note)
                whole = _Sequential(r)
            data = whole.read_at(start, length)
        except BaseException:
            if whole is not None:
                whole.close()
            raise
        self._whole[name] = whole
        return data

    def _stat(self, name: str):
        r = self.session.head(self.url(name), timeout=self._timeouts(), allow_redirects=True)
        if r.status_code == 404:
            return None
        r.raise_for_status()
        return int(r.headers.get("Content-Length", -1)), r.headers.get("ETag")

    def _open_at(self, name: str, offset: int, etag: str | None):
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if etag:
                headers["If-Match"] = etag
        r = self.session.get(self.url(name), headers=headers, stream=True, timeout=self._timeouts())
        if r.status_code == 412:
            r.close()
            raise StorageError(f"{self.url(name)}: object changed while it was being read")
        if r.status_code >= 400:
            r.close()       # a streamed response holds its connection until closed
            r.raise_for_status()
        length = r.headers.get("Content-Length")
        if offset and r.status_code == 200:      # no Range support: the whole object, read up to offset
            try:
                _Sequential(r).read_at(offset, 0)
            except BaseException:
                r.close()
                raise
            return r.raw, int(length) if length is not None else None, r.headers.get("ETag")
        total = offset + int(length) if length is not None else None
        return r.raw, total, r.headers.get("ETag")

    def _classify(self, exc):
        import requests
        import urllib3

        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            code = exc.response.status_code
            return code >= 500 or code in (408, 429)
        if isinstance(exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                            urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
            return True
        return None


class _Sequential:
    """A response holding a whole object, read front to back: ``read_at`` skips (reads and drops)
    up to ``start``, then reads ``length`` bytes; a read before ``pos`` needs a new response."""

    def __init__(self, response):
        self.response, self.pos = response, 0

    def read_at(self, start: int, length: int) -> bytearray:
        raw = self.response.raw
        while self.pos < start:
            got = raw.read(min(_CHUNK, start - self.pos))
            if not got:
                raise _Transient(f"stream ended at byte {self.pos}, before byte {start}")
            self.pos += len(got)
        data = bytearray()
        while len(data) < length:
            got = raw.read(min(_CHUNK, length - len(data)))
            if not got:
                break           # shorter than asked: read_range reports it
            data += got
        self.pos += len(data)
        return data

    def close(self) -> None:
        self.response.close()


# -- s3 ------------------------------------------------------------------------------------------
_S3_TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                 "InternalError", "ServiceUnavailable", "503", "500", "502", "504", "429"}


class S3Location(Location):
    """``s3://bucket/prefix`` on AWS or any S3-compatible server (path-style when an endpoint is set)."""

    def __init__(self, bucket: str, prefix: str, endpoint: str | None = None, retry: Retry | None = None):
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
        self.retry = retry or Retry()
        self.notes = []
        self._client, self._pid = None, None

    def __getstate__(self):
        return {**self.__dict__, "_client": None, "_pid": None}

    @property
    def client(self):
        if self._client is None or self._pid != os.getpid():
            import boto3
            from botocore.config import Config

            session = boto3.session.Session()
            cfg = Config(retries={"total_max_attempts": 1, "mode": "standard"},
                         connect_timeout=self.retry.connect_timeout, read_timeout=self.retry.read_timeout,
                         s3={"addressing_style": "path"} if self.endpoint else None)
            self._client = session.client("s3", endpoint_url=self.endpoint, config=cfg,
                                          region_name=session.region_name or "us-east-1")
            self._pid = os.getpid()
        return self._client

    def key(self, name: str) -> str:
        name = _check_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(name)}"

    def put_file(self, name: str, path: str | os.PathLike) -> None:
        """Upload the local file ``path`` as ``name`` (boto3's transfer manager: multipart for big
        files), with the same retries and one-line StorageError as reads."""
        self._with_retry(self.url(name), lambda: self.client.upload_file(os.fspath(path), self.bucket, self.key(name)))

    def has_bucket(self) -> bool:
        """Whether the bucket exists (one HEAD, retried). A bucket we may not look at counts as
        there: uploading into it says what is wrong."""
        from botocore.exceptions import ClientError

        def head() -> bool:
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as e:
                if _s3_code(e) in ("404", "NoSuchBucket", "NotFound"):
                    return False
                if _s3_code(e) in ("403", "AccessDenied"):
                    return True
                raise
            return True

        return self._with_retry(f"s3://{self.bucket}", head)

    def create_bucket(self) -> None:
        """Create the bucket (in the client's region), with the same retries as uploads."""
        region = self.client.meta.region_name
        where = {} if region in (None, "us-east-1") else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        self._with_retry(f"s3://{self.bucket}", lambda: self.client.create_bucket(Bucket=self.bucket, **where))

    def _read(self, name: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read()

    def _read_range(self, name: str, start: int, length: int) -> bytes:
        r = self.client.get_object(Bucket=self.bucket, Key=self.key(name), Range=f"bytes={start}-{start + length - 1}")
        return r["Body"].read()

    def _stat(self, name: str):
        from botocore.exceptions import ClientError

        try:
            r = self.client.head_object(Bucket=self.bucket, Key=self.key(name))
        except ClientError as e:
            if _s3_code(e) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return r["ContentLength"], r.get("ETag")

    def _open_at(self, name: str, offset: int, etag: str | None):
        kw = {}
        if offset:
            kw["Range"] = f"bytes={offset}-"
            if etag:
                kw["IfMatch"] = etag
        from botocore.exceptions import ClientError

        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key(name), **kw)
        except ClientError as e:
            if _s3_code(e) in ("PreconditionFailed", "412"):
                raise StorageError(f"{self.url(name)}: object changed while it was being read") from None
            raise
        return r["Body"], offset + r["ContentLength"], r.get("ETag")

    def _classify(self, exc):
        import botocore.exceptions as be
        import urllib3
        from boto3.exceptions import S3UploadFailedError

        if isinstance(exc, S3UploadFailedError):
            # boto3's transfer manager wraps the real cause
            return self._classify(exc.__context__) if exc.__context__ is not None else True
        if isinstance(exc, be.ClientError):
            code = _s3_code(exc)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in _S3_TRANSIENT or status >= 500 or status == 429:
                return True
            return False
        if isinstance(exc, (be.NoCredentialsError, be.PartialCredentialsError, be.ParamValidationError)):
            return False
        if isinstance(exc, (be.EndpointConnectionError, be.ConnectionError, be.HTTPClientError,
                            be.ResponseStreamingError, be.IncompleteReadError, be.ReadTimeoutError,
                            urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
            return True
        return None


def _s3_code(e) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


# -- entry points --------------------------------------------------------------------------------
def open_location(url_or_path: str | os.PathLike, *, s3_endpoint: str | None = None,
                  retry: Retry | None = None) -> Location:
    """The Location for a local folder, ``http(s)://host/prefix`` or ``s3://bucket/prefix``."""
    text = os.fspath(url_or_path)
    parsed = urlparse(text)
    if parsed.scheme in ("http", "https"):
        return HttpLocation(text, retry)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"{text}: an S3 URL needs a bucket (s3://bucket/prefix)")
        return S3Location(parsed.netloc, parsed.path, s3_endpoint, retry)
    if parsed.scheme == "file":
        return LocalLocation(parsed.path, retry)
    if parsed.scheme and len(parsed.scheme) > 1:
        raise ConfigError(f"{text}: unsupported location scheme {parsed.scheme!r} (use a folder, http(s):// or s3://)")
    return LocalLocation(text, retry)
