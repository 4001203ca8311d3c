"""Uploads of an output folder to ``s3://bucket/prefix``, in the order readers need.

Readers open dataset.json and the manifests first, so those go last: shards first, then the
files that name them (wids index, card, sample indexes, manifests) and dataset.json last, so
a concurrent reader never sees a file naming a missing shard. ``upload_folder`` sends a finished
folder (``avprep upload``); ``ShardUploader`` sends an s3:// extraction's shards while it runs.
Each file goes through ``storage.S3Location.put_file`` (retries, one-line ``StorageError``).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from . import shardformat as sf
from .errors import ConfigError
from .storage import Retry, S3Location, open_location

# After the shards, in this order: each of these names shards (dataset.json names the whole
# output), and readers open dataset.json and the manifests first, so once one is visible
# everything it names is already there. Other files (failures.jsonl) go right after the shards.
_AFTER_SHARDS = (sf.WIDS_SUFFIX, sf.INDEX_SUFFIX, sf.MANIFEST_SUFFIX, sf.CARD, sf.DATASET)


def upload_order(names) -> list[str]:
    """Shards first, then other files, then wids and sample indexes, manifests, the dataset card,
    and dataset.json last."""
    def rank(name: str) -> int:
        if name.endswith(sf.SHARD_SUFFIX):
            return 0
        for i, last in enumerate(_AFTER_SHARDS, start=2):
            if name == last or (last.startswith(".") and name.endswith(last)):
                return i
        return 1

    return sorted(names, key=lambda n: (rank(n), n))


def check_bucket(loc: S3Location, *, create: bool = False, offer_create: bool = True) -> None:
    """The bucket of ``loc`` exists, or is created with ``create``; else one ``ConfigError`` line
    that says so and how to create it (``--create-bucket`` too, with ``offer_create``)."""
    if loc.has_bucket():
        return
    if create:
        loc.create_bucket()
        return
    endpoint = f" --endpoint-url {loc.endpoint}" if loc.endpoint else ""
    raise ConfigError(f"s3://{loc.bucket}: no such bucket; create it first (aws s3 mb s3://{loc.bucket}{endpoint})"
                      + (" or pass --create-bucket" if offer_create else ""))


def _uploadable(rel: Path) -> bool:
    # dot folders hold resume state; ".tmp-" marks a shard still being written
    return not any(part.startswith(".") for part in rel.parts) and sf.TMP_MARK not in rel.name


def _folder_files(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and _uploadable(p.relative_to(root))]


def upload_folder(local_dir: str | os.PathLike, s3_url: str, *, s3_endpoint: str | None = None,
                  on_progress: Callable[[int, int, str], None] | None = None,
                  retry: Retry | None = None, create_bucket: bool = False) -> list[str]:
    """Upload every file of ``local_dir`` (recursively, skipping dotfiles and unfinished ``.tmp-``
    files) under ``s3_url``.

    Shards go first and the files that name them (``upload_order``: indexes, manifests, the card,
    dataset.json last), so a concurrent reader never sees a manifest naming a missing shard; the
    trade-off is that an interrupted upload leaves shards without a manifest (rerun it: uploads
    overwrite). A bucket that does not exist is a ``ConfigError`` (``check_bucket``), or is
    created with ``create_bucket``. ``on_progress(bytes_done, bytes_total, name)`` is called
    after each file. Returns the uploaded names in upload order.
    """
    loc = open_location(s3_url, s3_endpoint=s3_endpoint, retry=retry)
    if not isinstance(loc, S3Location):
        raise ConfigError(f"{s3_url}: uploads need an s3:// destination")
    root = Path(local_dir)
    if not root.is_dir():
        raise ConfigError(f"{root}: not a folder")
    check_bucket(loc, create=create_bucket)
    order = upload_order(_folder_files(root))
    total, done = sum((root / n).stat().st_size for n in order), 0
    for name in order:
        path = root / name
        loc.put_file(name, path)
        done += path.stat().st_size
        if on_progress is not None:
            on_progress(done, total, name)
    return order


class ShardUploader:
    """Uploads an extraction's shards from its local ``staging`` folder while the run goes on.

    ``submit(name)`` hands a committed shard to a few threads (boto3 clients are thread-safe),
    so decoding and assembly continue during the upload. At most ``max_pending`` uploads are
    unfinished: past that ``submit`` waits, so a slow store slows the run down instead of piling
    up work. ``submit`` raises the first failed upload's StorageError (the run stops early: later
    uploads would most likely fail too; the staging folder keeps everything for a rerun).
    ``finish()`` waits for every shard, then uploads the folder's other files in ``upload_order``
    (dataset.json last), so a reader never sees a manifest naming a missing shard. Used as a
    context manager: leaving on an exception cancels the uploads not yet started and waits for
    the running ones.

    ``submit(name, unless_present=True)`` (a shard kept from an earlier run) first asks the store
    for the object's size and skips the upload when an object of the local file's size is there:
    S3 objects appear only whole, and a shard's bytes are fixed by its plan, so an equal size is
    taken as the same shard (no hash is stored remotely to compare).
    """

    def __init__(self, loc: S3Location, staging: str | os.PathLike, *, threads: int = 3,
                 max_pending: int = 4):
        self.loc, self.root, self.max_pending = loc, Path(staging), max(1, max_pending)
        self.uploaded: list[str] = []           # names actually sent, in completion order
        self._submitted: set[str] = set()
        self._pending: set[Future] = set()
        _ = loc.client                          # made here: lazy creation from several threads races
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="avprep-upload")

    def __enter__(self) -> ShardUploader:
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, name: str, *, unless_present: bool = False) -> None:
        self._reap(self.max_pending - 1)
        self._submitted.add(name)
        self._pending.add(self._pool.submit(self._put, name, unless_present))

    def finish(self) -> list[str]:
        """Wait for the shards, then upload every other file (indexes, manifests, dataset.json
        last). Returns the names uploaded by this uploader, in order (skipped shards left out)."""
        self._reap(0)
        for name in upload_order(n for n in _folder_files(self.root) if n not in self._submitted):
            self.loc.put_file(name, self.root / name)
            self.uploaded.append(name)
        return list(self.uploaded)

    def _reap(self, most: int) -> None:
        """Collect finished uploads (raising the first failure), waiting while more than ``most``
        are unfinished."""
        while True:
            done = {f for f in self._pending if f.done()}
            self._pending -= done
            for f in done:
                f.result()
            if len(self._pending) <= most:
                return
            wait(self._pending, return_when=FIRST_COMPLETED)

    def _put(self, name: str, unless_present: bool) -> None:
        path = self.root / name
        if unless_present and self.loc.present_size(name) == path.stat().st_size:
            return
        self.loc.put_file(name, path)
        self.uploaded.append(name)              # list.append is atomic
