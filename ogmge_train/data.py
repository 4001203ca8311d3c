"""Streaming shards (SPEC §4) into batches for training and evaluation (SPEC §5).

Stages: a small streaming tar reader of our own (``read_samples``: groups members into samples,
selects frames, skips what no batch needs), webdataset's ``shuffle`` and ``batched`` inside a
webdataset ``DataPipeline``, then ``decode_batch``. The shards are opened through
``avprep.storage``, so a local folder, ``http(s)://`` and ``s3://`` share one retry/resume logic.
Why our own tar reader: ``tarfile`` (behind webdataset's tar expansion) costs more per sample than
decoding the sample's JPEG frame; ours parses a header with a few slices and seeks past unused
payloads on local files.

Safety: shards are untrusted. Only these decoders exist: ``cls`` -> int, ``json`` -> dict,
``spec.npy`` -> the ``.npy`` format with ``allow_pickle=False``, ``fNNN.jpg`` -> PIL, and only for the
frames selected for the batch. A pickle member (``.pyd``, ``.pickle``, ``.pkl``, ``.pth``, ``.pt``, by
name, before its bytes are read) or a pickled ``.npy`` raises ``ShardDataError`` naming the shard
and key; webdataset's auto-decoders (which unpickle) are never used. A truncated or corrupt tar
raises ``ShardDataError`` too (headers are checksummed; the end-of-archive block is required).

Splitting: the manifest's shard list is split by rank (``i % world_size``), then by DataLoader
worker. Evaluation reads every sample exactly once across all ranks and workers (no shuffle,
no repetition; a partial last batch per worker). Training shuffles the shard order with
``seed + epoch`` (same on every rank), uses a seeded shuffle buffer, and yields exactly
``steps_per_epoch`` batches on every rank, cycling through the rank's own shards when they run
short, so DDP ranks never wait on each other. The trade-off: in one epoch a rank may see some of
its samples twice and another rank may not reach all of its samples.
"""
from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import random
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache, partial
from itertools import islice

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from avprep.errors import AvprepError, ConfigError
from avprep.storage import Location, Retry, open_location

from .transforms import select_frames, transform_clip

_PICKLE_EXTS = {"pyd", "pickle", "pkl", "pth", "pt"}
_FRAME = re.compile(r"f(\d+)\.jpg")


class ShardDataError(AvprepError):
    """A shard, sample or manifest is malformed or unsafe (the message names where)."""


# -- dataset description -------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardInfo:
    name: str
    num_samples: int
    bytes: int | None = None
    sha256: str | None = None


@dataclass
class SplitInfo:
    name: str
    num_samples: int
    shards: list[ShardInfo]
    class_counts: dict = field(default_factory=dict)


@dataclass
class DatasetInfo:
    """dataset.json plus the manifests of its splits."""

    location: Location
    name: str
    classes: list[str]
    splits: dict[str, SplitInfo]
    meta: dict

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ConfigError(f"{self.location.url('dataset.json')}: no split {name!r} "
                              f"(have {', '.join(self.splits) or 'none'})")
        return self.splits[name]

    def shard_urls(self, split: str) -> list[str]:
        return [self.location.url(s.name) for s in self.split(split).shards]


def read_dataset(source, *, s3_endpoint: str | None = None, retry: Retry | None = None) -> DatasetInfo:
    """Read ``dataset.json`` and every split's ``<split>.manifest.json`` from a folder or URL."""
    if isinstance(source, DatasetInfo):
        return source
    loc = source if isinstance(source, Location) else open_location(source, s3_endpoint=s3_endpoint, retry=retry)
    meta = loc.read_json("dataset.json")
    where = loc.url("dataset.json")
    classes = meta.get("classes") if isinstance(meta, dict) else None
    if not isinstance(classes, list) or not classes:
        raise ShardDataError(f"{where}: no 'classes' list")
    names = list(meta.get("splits") or [])
    splits = {name: _read_manifest(loc, name) for name in names}
    return DatasetInfo(loc, str(meta.get("name", "")), [str(c) for c in classes], splits, meta)


def _read_manifest(loc: Location, split: str) -> SplitInfo:
    name = f"{split}.manifest.json"
    m = loc.read_json(name)
    try:
        shards = [ShardInfo(str(s["name"]), int(s["num_samples"]), s.get("bytes"), s.get("sha256"))
                  for s in m["shards"]]
        total = int(m["num_samples"])
    except (KeyError, TypeError, ValueError) as e:
        raise ShardDataError(f"{loc.url(name)}: malformed manifest ({type(e).__name__}: {e})") from None
    if sum(s.num_samples for s in shards) != total:
        raise ShardDataError(f"{loc.url(name)}: shard counts add up to {sum(s.num_samples for s in shards)}, "
                             f"not num_samples={total}")
    return SplitInfo(split, total, shards, dict(m.get("class_counts") or {}))


# -- shard assignment ----------------------------------------------------------------------------
def assign_shards(shards: list, *, rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1,
                  train: bool = False, seed: int = 0, epoch: int = 0) -> list:
    """The shards one DataLoader worker of one rank reads: split by rank, then by worker.

    Training first shuffles the order with ``(seed, epoch)``, identically on every rank, so the
    assignment changes per epoch but stays disjoint. Evaluation keeps manifest order.
    """
    order = list(shards)
    if train:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return order[rank::world_size][worker::num_workers]


def _worker_steps(steps: int, worker: int, num_workers: int) -> int:
    return steps // num_workers + (1 if worker < steps % num_workers else 0)


# -- a minimal streaming tar reader --------------------------------------------------------------
_BLOCK = 512
_ZERO = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_NAME = re.compile(r"((?:.*/|)[^.]+)\.([^/]*)")     # webdataset's key/extension split
_SKIP_CHUNK = 1 << 16
_MAX_MEMBER = 1 << 30


class _Tar:
    """The regular members of one tar stream, in order.

    ``members()`` yields ``(name, size)``; the caller may ``read(size)`` the payload, otherwise it
    is skipped (a seek on seekable streams such as local files, read-and-discard on network
    streams). ustar, GNU long names and pax ``path``/``size`` records are understood; headers are
    checksummed, and a stream must end with the end-of-archive block, so a truncated shard fails
    instead of silently losing its tail. Why not ``tarfile``: it builds a TarInfo per member in
    Python and reads every payload; this is a few slices and one ``int(.., 8)`` per member.
    """

    def __init__(self, stream, url: str):
        self.f, self.url = stream, url
        self.pos = 0       # stream offset reached
        self.left = 0      # unread bytes of the current member, padding included
        self.seekable = stream.seekable()

    def _fail(self, problem: str):
        raise ShardDataError(f"{self.url}: not a readable tar shard ({problem})")

    def read(self, n: int) -> bytearray:
        if n > _MAX_MEMBER:     # a hostile header must not make us allocate gigabytes up front
            self._fail(f"a member of {n} bytes at byte {self.pos}; the limit is {_MAX_MEMBER >> 20} MiB")
        data = bytearray(n)     # writable: numpy and torch can view it without a copy
        got = self.f.readinto(data)
        if got != n:
            self._fail(f"truncated at byte {self.pos + got}")
        self.pos += n
        self.left -= n
        return data

    def _skip(self) -> None:
        if self.seekable:
            self.f.seek(self.left, 1)   # past the end is caught by the next header read
            self.pos += self.left
            self.left = 0
        while self.left:
            data = self.f.read(min(self.left, _SKIP_CHUNK))
            if not data:
                self._fail(f"truncated at byte {self.pos}")
            self.pos += len(data)
            self.left -= len(data)

    def members(self):
        name = size = None     # from a GNU long-name or pax header, for the next member only
        while True:
            self._skip()
            header = self.f.read(_BLOCK)
            if len(header) != _BLOCK:
                self._fail("empty file" if self.pos == 0 and not header else
                           f"truncated at byte {self.pos + len(header)}: no end-of-archive block")
            if header == _ZERO:
                return
            n = self._header_size(header)
            self.pos += _BLOCK
            self.left = n + -n % _BLOCK
            kind = header[156:157]
            if kind == b"L":
                name = _cstr(self.read(n))
            elif kind == b"x":
                pax = self._pax(self.read(n))
                name, size = pax.get("path", name), int(pax["size"]) if "size" in pax else size
            elif kind in _REGULAR:
                if size is not None:
                    self.left = size + -size % _BLOCK
                yield name or _header_name(header), size if size is not None else n
                name = size = None
            elif kind != b"g":          # links, directories, devices: not sample members
                name = size = None

    def _header_size(self, header: bytes) -> int:
        stored = header[148:156]
        check = sum(header) - sum(stored) + 8 * 32     # the checksum field counts as spaces
        try:
            want = int(_cstr(stored).strip() or "-1", 8)
            # old writers summed signed bytes
            ok = want == check or want == check - 256 * sum(b > 127 for b in header)
            n = _number(header[124:136])
        except ValueError:
            ok = False
        if not ok:
            self._fail("gzip-compressed; shards must be plain .tar" if self.pos == 0 and header[:2] == b"\x1f\x8b"
                       else f"bad header at byte {self.pos}")
        return n

    def _pax(self, data: bytes) -> dict:
        records, i = {}, 0
        try:
            while i < len(data) and data[i:i + 1] != b"\0":
                length = int(data[i:data.index(b" ", i)])
                if length <= 0:     # a record must move forward, or this loop never ends
                    raise ValueError("bad record length")
                key, _, value = data[data.index(b" ", i) + 1:i + length - 1].partition(b"=")
                records[key.decode()] = value.decode("utf-8", "surrogateescape")
                i += length
            if "size" in records and int(records["size"]) < 0:
                raise ValueError("negative size")
        except ValueError:
            self._fail(f"bad pax header before byte {self.pos}")
        return records


def _cstr(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    if field[0] & 0x80:     # GNU base-256 for sizes >= 8 GiB
        if field[0] == 0xFF:
            raise ValueError("negative size")
        return int.from_bytes(field[1:], "big")
    n = int(_cstr(field).strip() or "0", 8)
    if n < 0:     # int(.., 8) accepts a sign; a negative size would seek backwards forever
        raise ValueError("negative size")
    return n


def _header_name(header: bytes) -> str:
    name = _cstr(header[:100])
    if header[257:263] == b"ustar\0" and header[345]:     # POSIX prefix (GNU uses the field otherwise)
        name = f"{_cstr(header[345:500])}/{name}"
    return name


# -- samples -------------------------------------------------------------------------------------
@dataclass(slots=True)
class Sample:
    """One sample as read from a shard, still encoded: only what the batch needs is kept
    (``cls``, ``spec.npy``, the selected frames, ``json`` when asked for)."""

    key: str
    url: str
    members: dict[str, bytearray]
    frames: list[tuple[str, bytearray]]     # (member extension, JPEG bytes) of the selected frames, in order

    @property
    def where(self) -> str:
        return f"{self.url}: sample {self.key}"


def read_samples(stream, url: str, *, frames: int, train: bool, rng=None, keep_json: bool = False):
    """The samples of one shard stream (a ``Location.open`` reader), grouped by key as webdataset does.

    Every member name is checked: a pickle extension raises ``ShardDataError`` before any of its
    bytes are read. Frames are selected here (``select_frames``; ``rng`` draws them when training)
    and only the selected ones are kept, so a shuffle buffer holds no unused JPEGs; members no
    batch needs (``json`` unless ``keep_json``, anything unknown) are skipped unread.
    """
    tar = _Tar(stream, url)
    key, members, found, seen = None, {}, [], set()
    for name, size in tar.members():
        m = _NAME.fullmatch(name)
        if m is None:       # no extension: not part of a sample (webdataset skips these too)
            continue
        if m[1] != key:
            if key is not None:
                yield _finish(key, url, members, found, frames, train, rng)
            key, members, found, seen = m[1], {}, [], set()
        ext = m[2].lower()
        if ext.rsplit(".", 1)[-1] in _PICKLE_EXTS:
            raise ShardDataError(f"{url}: sample {key}: member {name} is a pickle; "
                                 "refusing to unpickle untrusted shards")
        if ext in seen:
            raise ShardDataError(f"{url}: sample {key}: member {name} appears twice")
        seen.add(ext)
        frame = _FRAME.fullmatch(ext)
        if frame:
            found.append((int(frame[1]), ext, tar.read(size)))
        elif ext in ("cls", "spec.npy") or (ext == "json" and keep_json):
            members[ext] = tar.read(size)
    if key is not None:
        yield _finish(key, url, members, found, frames, train, rng)


def _finish(key, url, members, found, frames, train, rng) -> Sample:
    for need in ("cls", "spec.npy"):
        if need not in members:
            raise ShardDataError(f"{url}: sample {key}: missing member {key}.{need}")
    if not found:
        raise ShardDataError(f"{url}: sample {key}: no frames ({key}.f000.jpg ...)")
    found.sort(key=lambda f: f[0])
    return Sample(key, url, members, [found[i][1:] for i in select_frames(len(found), frames, train, rng)])


def _shard_samples(location: Location, shards: list[str], **read):
    for name in shards:
        with location.open(name) as stream:
            yield from read_samples(stream, location.url(name), **read)


def _train_samples(location: Location, shards: list[str], shuffle, order_rng: random.Random, **read):
    """Endless passes over this worker's shards, each pass in a new seeded shard order and
    shuffled on its own (so a small worker's buffer never holds two copies of a sample)."""
    while True:
        order = list(shards)
        order_rng.shuffle(order)
        n = 0
        for sample in shuffle(_shard_samples(location, order, **read)):
            n += 1
            yield sample
        if n == 0:
            raise ShardDataError(f"{location.url(order[0])}: the shards of this worker hold no samples")


# -- decoding ------------------------------------------------------------------------------------
def _empty(*shape: int) -> torch.Tensor:
    """An uninitialised float32 tensor; inside a DataLoader worker it is allocated in shared memory
    (as torch's default_collate does), so handing the batch to the main process copies nothing."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape)
    proto = torch.empty(0)
    return proto.new(proto._typed_storage()._new_shared(math.prod(shape), device="cpu")).view(shape)


def _label(s: Sample) -> int:
    try:
        return int(s.members["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ShardDataError(f"{s.where}: {s.key}.cls is not an ASCII integer") from None


def _spec(s: Sample) -> np.ndarray:
    """The ``.npy`` format only (no pickle fallback); float dtypes only, so object arrays, which
    would need unpickling, are refused. Zero-copy view of the member's bytes."""
    data = s.members["spec.npy"]
    try:
        if data[:6] != b"\x93NUMPY" or data[6:7] not in (b"\x01", b"\x02"):
            raise ValueError("not a version 1 or 2 .npy file")
        start = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else \
            12 + int.from_bytes(data[8:12], "little")
        shape, fortran, dtype = _npy_header(bytes(data[:start]))
    except ValueError as e:
        raise ShardDataError(f"{s.where}: {s.key}.spec.npy is not a plain array ({e})") from None
    if len(shape) != 2 or dtype.kind != "f":
        raise ShardDataError(f"{s.where}: {s.key}.spec.npy has shape {shape} dtype {dtype}; "
                             "expected a 2-D float array")
    count = math.prod(shape)
    if len(data) - start != count * dtype.itemsize:
        raise ShardDataError(f"{s.where}: {s.key}.spec.npy holds {len(data) - start} data bytes, "
                             f"not the {count * dtype.itemsize} of its header")
    spec = np.frombuffer(data, dtype, count, start).reshape(shape, order="F" if fortran else "C")
    return spec if dtype.isnative else spec.astype(dtype.newbyteorder("="))


@lru_cache(maxsize=16)
def _npy_header(head: bytes) -> tuple:
    """(shape, fortran_order, dtype), by numpy's own safe header parser; cached because all the
    spectrograms of a dataset share one header (the parser costs as much as decoding the rest)."""
    f = io.BytesIO(head)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


def _jpeg(s: Sample, ext: str, data: bytes) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data), formats=["JPEG"])
        im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise ShardDataError(f"{s.where}: {s.key}.{ext} is not a readable JPEG ({e})") from None
    return im


def decode_batch(samples: list[Sample], *, train: bool, image_size: int, rng=None, per_frame: bool = False,
                 with_meta: bool = False) -> dict:
    """Encoded samples -> ``{"audio": float32 (B,1,F,T), "visual": float32 (B,n,3,S,S), "label": int64 (B,),
    "key": [str]}`` (+ ``"meta"``), with the safe decoders only (see the module docstring).

    Each sample is decoded straight into its slot of the batch tensors (no per-sample tensors to
    stack); the float16 spectrogram is widened by torch, several times faster than numpy's astype.
    """
    specs = [_spec(s) for s in samples]
    audio = _empty(len(samples), 1, *specs[0].shape)
    visual = _empty(len(samples), len(samples[0].frames), 3, image_size, image_size)
    for i, (s, spec) in enumerate(zip(samples, specs)):
        if spec.shape != specs[0].shape:
            raise ShardDataError(f"{s.where}: spectrogram shape {spec.shape} differs from {specs[0].shape} "
                                 f"of sample {samples[0].key} in the same batch")
        audio[i, 0].copy_(torch.from_numpy(spec))
        transform_clip([_jpeg(s, ext, data) for ext, data in s.frames], train=train, image_size=image_size,
                       rng=rng, per_frame=per_frame, out=visual[i])
    batch = {"audio": audio, "visual": visual,
             "label": torch.tensor([_label(s) for s in samples], dtype=torch.int64),
             "key": [s.key for s in samples]}
    if with_meta:
        batch["meta"] = [_meta(s) for s in samples]
    return batch


def _meta(s: Sample) -> dict:
    try:
        return json.loads(s.members["json"]) if "json" in s.members else {}
    except ValueError:
        raise ShardDataError(f"{s.where}: {s.key}.json is not valid JSON") from None


# -- the dataset and loader ----------------------------------------------------------------------
class ShardStream(torch.utils.data.IterableDataset):
    """Batches of one split for one rank; each DataLoader worker reads its own shards.

    Stages: our tar reader (grouping, frame selection) -> webdataset ``shuffle`` (training) ->
    webdataset ``batched`` -> ``decode_batch``. Decoding after batching lets a batch be decoded
    straight into (shared-memory) batch tensors.
    """

    def __init__(self, location: Location, shards: list[str], *, train: bool, batch_size: int, frames: int,
                 image_size: int, seed: int, epoch: int, rank: int, world_size: int, num_workers: int,
                 shuffle_buffer: int, drop_last: bool, steps: int | None, per_frame: bool = False,
                 with_meta: bool = False):
        super().__init__()
        self.location, self.shards = location, list(shards)
        self.train, self.batch_size, self.frames, self.image_size = train, batch_size, frames, image_size
        self.seed, self.rank, self.world_size, self.num_workers = seed, rank, world_size, num_workers
        self.shuffle_buffer, self.drop_last, self.steps = shuffle_buffer, drop_last, steps
        self.per_frame, self.with_meta = per_frame, with_meta
        # shared with (persistent) workers so set_epoch reaches them
        self.epoch = mp.RawValue("q", epoch)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        epoch = self.epoch.value
        mine = assign_shards(self.shards, rank=self.rank, world_size=self.world_size, worker=worker,
                             num_workers=self.num_workers, train=self.train, seed=self.seed, epoch=epoch)
        tag = f"{self.seed}:{epoch}:{self.rank}:{worker}"
        read = {"frames": self.frames, "train": self.train, "keep_json": self.with_meta,
                "rng": random.Random(f"frames:{tag}")}
        decode = wds.map(partial(decode_batch, train=self.train, image_size=self.image_size,
                                 rng=random.Random(f"aug:{tag}"), per_frame=self.per_frame,
                                 with_meta=self.with_meta))
        if self.train:
            if not mine:
                return iter(())
            steps = _worker_steps(self.steps, worker, self.num_workers)
            shuffle = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100),
                                  rng=random.Random(f"buffer:{tag}"))
            pipeline = wds.DataPipeline(
                partial(_train_samples, self.location, mine, shuffle, random.Random(f"shards:{tag}"), **read),
                wds.batched(self.batch_size, collation_fn=None, partial=False),
                lambda src: islice(src, steps), decode)
        else:
            pipeline = wds.DataPipeline(
                partial(_shard_samples, self.location, mine, **read),
                wds.batched(self.batch_size, collation_fn=None, partial=not self.drop_last), decode)
        return iter(pipeline)


class ShardLoader:
    """Iterable of batches for one split and rank; ``len()`` is its number of batches per epoch.

    ``set_epoch(e)`` reseeds the next iteration (works with persistent workers too).
    """

    def __init__(self, stream: ShardStream, loader: torch.utils.data.DataLoader, num_batches: int,
                 num_samples: int, info: DatasetInfo):
        self.stream, self.loader, self.info = stream, loader, info
        self.num_batches, self.num_samples = num_batches, num_samples

    @property
    def steps_per_epoch(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.stream.epoch.value = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        return iter(self.loader)


def default_steps_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """floor(samples / (batch × ranks)): one epoch sees about every sample once across ranks."""
    return num_samples // (batch_size * world_size)


def make_loader(source, split: str, *, train: bool, batch_size: int, frames: int, image_size: int = 224,
                workers: int = 2, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                shuffle_buffer: int = 1000, s3_endpoint: str | None = None, drop_last: bool | None = None,
                steps_per_epoch: int | None = None, pin_memory: bool = False, persistent_workers: bool = False,
                prefetch_factor: int | None = None, per_frame: bool = False, with_meta: bool = False,
                retry: Retry | None = None) -> ShardLoader:
    """A loader over ``split`` of ``source`` (folder, URL, or a ``DatasetInfo`` from read_dataset).

    Batches: ``{"audio": float32 (B,1,F,T) ((B,1,T,mel) for fbank), "visual": float32 (B,n,3,S,S),
    "label": int64 (B,), "key": [str]}``. Training yields exactly ``steps_per_epoch`` full batches
    on every rank (default: floor(split samples / (batch_size × world_size))) and needs at least
    ``max(workers, 1) × world_size`` shards. Evaluation yields every sample of this rank's shards
    once (partial batches kept unless ``drop_last``); ranks may get different batch counts, so
    reduce eval metrics with sums, not per-batch collectives. The shuffle buffer holds encoded
    samples: each training worker keeps up to ``shuffle_buffer`` × (spectrogram + JPEG bytes)
    in memory (about 0.5 MB per sample for the 10 s float16 ``paper`` preset).
    """
    info = read_dataset(source, s3_endpoint=s3_endpoint, retry=retry)
    sp = info.split(split)
    if batch_size < 1 or frames < 1 or image_size < 1:
        raise ConfigError(f"batch size, frames and image size must be positive "
                          f"(got {batch_size}, {frames}, {image_size})")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world size {world_size}")
    num_workers = max(workers, 1)
    names = [s.name for s in sp.shards]
    drop_last = train if drop_last is None else drop_last
    if train:
        if len(names) < num_workers * world_size:
            raise ConfigError(
                f"split {split!r} has {len(names)} shard(s) but {world_size} rank(s) × {num_workers} worker(s) "
                f"need at least {num_workers * world_size}: lower --workers or re-extract with a smaller --shard-size")
        steps = steps_per_epoch if steps_per_epoch is not None else \
            default_steps_per_epoch(sp.num_samples, batch_size, world_size)
        if steps < 1:
            raise ConfigError(f"split {split!r} has {sp.num_samples} samples, fewer than one batch of "
                              f"{batch_size} × {world_size} rank(s): lower --batch-size")
        num_batches, num_samples = steps, steps * batch_size
    else:
        # idle workers cost start-up time only: use no more than this rank has shards
        workers = min(workers, len(names[rank::world_size]))
        num_workers = max(workers, 1)
        steps, num_batches, num_samples = None, 0, 0
        counts = {s.name: s.num_samples for s in sp.shards}
        for w in range(num_workers):
            n = sum(counts[name] for name in assign_shards(names, rank=rank, world_size=world_size,
                                                           worker=w, num_workers=num_workers))
            num_samples += n
            num_batches += n // batch_size if drop_last else math.ceil(n / batch_size)
    stream = ShardStream(info.location, names, train=train, batch_size=batch_size, frames=frames,
                         image_size=image_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                         num_workers=num_workers, shuffle_buffer=shuffle_buffer, drop_last=drop_last,
                         steps=steps, per_frame=per_frame, with_meta=with_meta)
    extra = {}
    if workers > 0:
        extra = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor or 2}
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                         **extra)
    return ShardLoader(stream, loader, num_batches, num_samples, info)


def benchmark_loader(loader, *, max_batches: int | None = None, warmup: int = 1) -> dict:
    """Read up to ``max_batches`` batches; samples/s is timed after the first ``warmup`` batches
    (worker start-up and first shard opens excluded). For the loader benchmark, not for tests."""
    n_batches = n_samples = 0
    start = time.perf_counter()
    for i, batch in enumerate(islice(loader, max_batches)):
        if i < warmup:
            start = time.perf_counter()
            continue
        n_batches += 1
        n_samples += len(batch["key"])
    seconds = time.perf_counter() - start
    return {"batches": n_batches, "samples": n_samples, "seconds": seconds,
            "samples_per_s": n_samples / seconds if n_batches and seconds > 0 else float("nan")}
