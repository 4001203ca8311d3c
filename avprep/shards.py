"""Shard planning and deterministic, atomic tar writing (README: Output).

A shard's membership is decided before any media is decoded, from the sorted clip keys
alone, so a shard's bytes depend only on its clips and the options, never on worker count
or completion order. That is also what makes resuming safe: a shard either exists under its
final name complete (tmp + fsync + rename) or does not exist.
"""
from __future__ import annotations

import hashlib
import math
import os
import tarfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from . import shardformat
from .atomicfile import commit, write_atomic
from .config import ExtractConfig
from .datasets._base import Clip
from .shardformat import TMP_MARK, shard_name, split_order  # noqa: F401 - re-exported: the format owns them


@dataclass(frozen=True)
class ShardPlan:
    """One shard to write: its file name, split and clips (sorted by key)."""

    name: str
    split: str
    clips: tuple[Clip, ...]


@dataclass(frozen=True)
class WrittenShard:
    name: str
    num_samples: int
    bytes: int
    sha256: str


def estimate_sample_bytes(cfg: ExtractConfig) -> int:
    """A deterministic guess of one sample's tar size, used only to cap shard bytes.

    The spectrogram size is exact; frames are counted from the preset's duration and sized
    from the frame size and JPEG quality (a 16:9 frame at ~0.4-2.7 bits per pixel), because
    the real sizes are only known after decoding, too late to decide shard membership.
    """
    rows, cols = cfg.spec.shape
    spec = rows * cols * (2 if cfg.spec_dtype == "float16" else 4) + 128
    n_frames = max(1, math.floor(cfg.spec.duration * cfg.fps))
    short = cfg.frame_size or 720
    pixels = short * short * 16 / 9
    bits_per_pixel = 0.4 + 2.3 * (cfg.jpeg_quality / 100) ** 3
    frame = int(pixels * bits_per_pixel / 8)
    per_member = 1024  # header + average padding
    return spec + n_frames * frame + (3 + n_frames) * per_member + 64


def plan_shards(clips: Iterable[Clip], cfg: ExtractConfig) -> list[ShardPlan]:
    """Group clips per split, sort by key, and cut into shards of at most ``cfg.shard_size``
    samples (and, with ``cfg.shard_max_bytes``, at most that many estimated bytes; a shard
    always holds at least one sample)."""
    by_split: dict[str, list[Clip]] = {}
    for clip in clips:
        by_split.setdefault(clip.split, []).append(clip)
    per_sample = estimate_sample_bytes(cfg) if cfg.shard_max_bytes else 0
    plans = []
    for split in split_order(by_split):
        chunks: list[list[Clip]] = [[]]
        for clip in sorted(by_split[split], key=lambda c: c.key):
            chunk = chunks[-1]
            full = len(chunk) >= cfg.shard_size or (
                cfg.shard_max_bytes and (len(chunk) + 1) * per_sample > cfg.shard_max_bytes)
            if chunk and full:
                chunks.append([])
            chunks[-1].append(clip)
        plans += [ShardPlan(shard_name(split, i), split, tuple(c)) for i, c in enumerate(chunks)]
    return plans


_PAD = b"\0" * tarfile.BLOCKSIZE


def _member(name: str, size: int) -> bytes:
    """The tar header of a regular file ``name`` of ``size`` bytes, with fixed metadata, as
    tarfile's PAX writer makes it (a pax record first for names it cannot store plainly)."""
    raw = name.encode("ascii", "replace")
    if len(raw) > 100 or not name.isascii() or size >= 8 ** 11:
        return _tarfile_member(name, size)
    # tarfile's header, ~10x faster: only the name, size and checksum fields differ
    header = bytearray(_HEADER)
    header[0:len(raw)] = raw
    header[124:136] = b"%011o\0" % size
    header[148:155] = b"%06o\0" % sum(header)     # over the checksum field as 8 spaces
    return bytes(header)


def _tarfile_member(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


_HEADER = bytearray(_tarfile_member("", 0))
_HEADER[148:156] = b" " * 8


@dataclass(frozen=True)
class EncodedSample:
    """One sample as the bytes it occupies in a shard: each member's header, payload and
    padding, contiguous. A tar member does not depend on where it lies in the archive, so
    workers encode samples and the shard writer only appends them (one write, no re-encoding)."""

    key: str
    data: bytes
    crc32: int                  # of ``data``: the sample index's checksum


def encode_sample(key: str, members: Mapping[str, bytes]) -> EncodedSample:
    """``members`` (extension -> payload, in tar order) of sample ``key`` as tar bytes, exactly
    what ``tarfile`` writes for them in PAX format with fixed headers."""
    if "." in key or not key:
        raise ValueError(f"sample key {key!r} must be non-empty and hold no dot")
    parts = []
    for ext, payload in members.items():
        parts += [_member(f"{key}.{ext}", len(payload)), payload, _PAD[:-len(payload) % tarfile.BLOCKSIZE]]
    data = b"".join(parts)
    return EncodedSample(key, data, zlib.crc32(data))


def tmp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True, sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, through
    ``<path>.tmp-<pid>`` (``atomicfile.write_atomic``: ``durable`` and ``sync_dir`` are its)."""
    write_atomic(path, lambda tmp: tmp.write_bytes(data), tmp=tmp_path(path), durable=durable, sync_dir=sync_dir)


class ShardWriter:
    """Streams samples into ``<path>.tmp-<pid>`` and renames it to ``path`` on ``commit``, so
    a worker holds one sample in memory, not a shard, and the final name only ever shows a
    complete, fsynced tar. Leaving the ``with`` block without ``commit`` removes the tmp file.
    Samples must be added in key order (the planner's order)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = tmp_path(self.path)
        self._file = open(self.tmp, "wb")
        self._sha = hashlib.sha256()
        self.size = 0
        self._last_key: str | None = None
        self.num_samples = 0

    def add(self, key: str, members: Mapping[str, bytes]) -> dict[str, int]:
        """One sample: its members contiguous, in the given order, with fixed headers (see
        ``add_encoded``)."""
        return self.add_encoded(encode_sample(key, members))

    def add_encoded(self, sample: EncodedSample) -> dict[str, int]:
        """Append a sample encoded by ``encode_sample`` (possibly in another process). Returns
        its sample-index fields (``shardformat.INDEX_FIELDS``): the offset of its first header,
        its length up to the next sample, and the CRC-32 of those bytes."""
        if self._last_key is not None and sample.key <= self._last_key:
            raise ValueError(f"sample keys must increase: {sample.key!r} after {self._last_key!r}")
        offset = self.size
        self._file.write(sample.data)
        self._sha.update(sample.data)
        self.size += len(sample.data)
        self._last_key = sample.key
        self.num_samples += 1
        return dict(zip(shardformat.INDEX_FIELDS, (offset, len(sample.data), sample.crc32)))

    def commit(self, sync_dir: bool = True) -> WrittenShard:
        """Write the end of the archive, fsync and rename to the final name. ``sync_dir=False``
        leaves the folder's fsync (which makes the rename survive a power loss) to the caller,
        to do once for many shards; the name never shows a partial file either way."""
        # as tarfile closes an archive: two zero blocks, then zeros up to a whole record
        end = 2 * tarfile.BLOCKSIZE
        end += -(self.size + end) % tarfile.RECORDSIZE
        self._file.write(bytes(end))
        self._sha.update(bytes(end))
        self.size += end
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        commit(self.tmp, self.path, sync_dir=sync_dir)
        return WrittenShard(self.path.name, self.num_samples, self.size, self._sha.hexdigest())

    def abort(self) -> None:
        try:
            if not self._file.closed:
                self._file.close()
        except OSError:         # e.g. the disk filled up: the temp file must still go
            pass
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if not self._file.closed or self.tmp.exists():
            self.abort()


def write_shard(path: Path, samples: Mapping[str, Mapping[str, bytes]]) -> WrittenShard:
    """Write ``{key: {ext: bytes}}`` as a tar at ``path``, samples sorted by key (atomic)."""
    with ShardWriter(path) as writer:
        for key in sorted(samples):
            writer.add(key, samples[key])
        return writer.commit()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def index_dataset(out: Path, *, on_progress=None) -> dict[str, int]:
    """Write the sample index (``<split>.samples.jsonl`` with byte offsets, length and CRC-32 of
    every sample) and ``<split>.wids.json`` for a local dataset written before they existed,
    reading each shard once and rewriting no shard. Existing records keep their fields (label,
    source, duration); samples without one get them from their ``.cls`` and ``.json``.
    ``on_progress(done, total, shard)`` after each shard. Returns samples indexed per split.
    Raises ``ShardDataError`` when a shard is not a readable tar or holds fewer samples than its
    manifest (verify it first), ``StorageError`` when dataset.json or a manifest cannot be read."""
    import json

    out = Path(out)
    dataset = shardformat.open_dataset(out)
    label_members = {shardformat.CLS, shardformat.JSON}      # all a record needs
    meta, manifests = dataset.meta, dataset.splits
    total = sum(len(m.shards) for m in manifests.values())
    done, counts = 0, {}
    for split, manifest in manifests.items():
        path = out / shardformat.index_name(split)
        old = shardformat.index_records(path.read_bytes(), str(path)) if path.exists() else {}
        records = []
        for entry in manifest.shards:
            url = str(out / entry.name)
            with open(url, "rb") as f:
                samples = list(shardformat.read_shard_samples(f, url, size=os.fstat(f.fileno()).st_size,
                                                              keep=label_members.__contains__))
            if len(samples) != entry.num_samples:
                raise shardformat.ShardDataError(f"{url}: {len(samples)} samples, the manifest says "
                                                 f"{entry.num_samples}; run avprep verify", check="count")
            for s in samples:
                r = dict(old.get(s.key) or {})
                if "label_index" not in r:
                    r["label_index"] = shardformat.parse_cls(s.members.get(shardformat.CLS, b"x"),
                                                               len(meta.classes))
                    r["label"] = meta.classes[r["label_index"]]
                    try:
                        j = json.loads(bytes(s.members.get(shardformat.JSON, b"{}")))
                    except ValueError:
                        j = {}
                    r.setdefault("source", j.get("source", "") if isinstance(j, dict) else "")
                    r.setdefault("duration", j.get("duration", 0.0) if isinstance(j, dict) else 0.0)
                r.update(key=s.key, shard=entry.name, offset=s.offset, length=s.length, crc32=s.crc32,
                         n_frames=sum(1 for e in s.present if shardformat.FRAME.fullmatch(e)))
                records.append(r)
            done += 1
            if on_progress:
                on_progress(done, total, entry.name)
        index = shardformat.SampleIndex.from_records(split, records)
        atomic_write_bytes(path, index.to_json())
        atomic_write_bytes(out / shardformat.wids_name(split), shardformat.wids_index(split, manifest.shards))
        counts[split] = len(records)
    return counts
