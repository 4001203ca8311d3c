"""Samples of extracted shards (README: Output) as batches for training and evaluation (README: Training).

The sample index (``<split>.samples.jsonl``: shard, byte offset, length and CRC-32 of every
sample) makes the sample, not the shard, the unit of work: any number of ranks × DataLoader
workers reads any number of shards. Each worker fetches its samples as byte ranges over runs of
consecutive samples (one local read, HTTP or S3 ``Range`` request per run, never one per member),
checks every sample's CRC-32, parses it with ``avprep.shardformat`` (the same parser ``avprep
verify`` uses) and decodes it with the safe decoders only: ``cls`` -> int in [0, num_classes),
``spec.npy`` -> a finite 2-D float array (``.npy`` header parsed without evaluating anything),
the selected ``fNNN.jpg`` frames -> PIL (size checked before decoding). Pickle members are
refused by name, never read.

A corrupt sample (checksum, structure, label, non-finite spectrogram, undecodable JPEG) is
skipped: the batch comes out smaller, ``on_bad_sample(shard_url, key, message)`` is called in the
main process, and past ``max_bad_samples`` the loader raises ``ogmge_train.errors.DataError``.

Partition rule (``plan_eval`` / ``plan_train``):
- evaluation: the split's samples in index order, cut into ``world_size × workers`` contiguous
  blocks (consumer ``rank × workers + worker``); every sample is read exactly once; each worker
  keeps its partial last batch.
- training: the samples are cut into runs of ``run`` consecutive samples of one shard; the runs
  are shuffled with ``(seed, epoch)`` (the same on every rank); the order is cut to
  ``steps × batch × world_size`` samples (only the last partial global batch is dropped); rank r
  takes the r-th of ``world_size`` equal slices, and its worker w a contiguous part holding exactly
  its batches (``_worker_steps``). Each worker reads its runs and passes them through a seeded
  shuffle buffer, so batches mix samples of different runs and shards. Every train sample is
  visited at most once per epoch, every rank runs the same number of steps, and nothing cycles.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import Any

import numpy as np
import torch

from avprep import shardformat as sf
from avprep.shardformat import ShardDataError
from avprep.storage import Location, Retry

from .errors import ConfigError, DataError
from .transforms import normalize_, select_frames, transform_clip

RUN_BYTES = 2 << 20     # a training run holds about this many bytes (fewer requests vs. more mixing)
MAX_RUN_BYTES = 16 << 20


# -- dataset description -------------------------------------------------------------------------
class DatasetInfo(sf.Dataset):
    """The dataset as ``avprep.shardformat.open_dataset`` reads it (dataset.json, the manifests,
    the sample indexes on first use), with the loader's lookups. ``on_warning(message)``, when
    set, hears what every loader of this dataset has to say once (e.g. a server that ignores
    Range requests) unless the loader is given its own."""

    on_warning: Callable[[str], None] | None = None

    def split(self, name: str) -> sf.Manifest:
        if name not in self.splits:
            raise ConfigError(f"{self.location.url(sf.DATASET)}: no split {name!r} "
                              f"(have {', '.join(self.splits) or 'none'})")
        return self.splits[name]

    def shard_urls(self, split: str) -> list[str]:
        return [self.location.url(s.name) for s in self.split(split).shards]

    def index(self, split: str, problems=None) -> list[sf.IndexEntry]:
        """The split's sample index (``sf.Dataset.index``), after every split's index was checked
        together on first use (``sf.Dataset.check_indexes``: no key twice, no leak between splits,
        labels agreeing with dataset.json)."""
        self.split(split)
        entries = super().index(split, problems)
        self.check_indexes()
        return entries

    def fingerprint(self) -> dict:
        """What a model trained on this dataset depends on (recorded in every checkpoint): the
        dataset name, the ordered class names, per split its size and a digest of its keys, and
        the extraction settings that change the model's inputs (``INPUT_SETTINGS``)."""
        self.check_indexes()
        config, raw = self.meta.config, self.meta.raw
        inputs = {k: config[k] for k in INPUT_SETTINGS if k in config}
        if "spec_shape" in raw:
            inputs["spec_shape"] = raw["spec_shape"]
        splits = {}
        for split in self.splits:
            entries = self.index(split)
            keys = "\n".join(sorted(e.key for e in entries))
            splits[split] = {"samples": len(entries),
                             "keys": hashlib.sha256(keys.encode("utf-8", "surrogateescape")).hexdigest()[:16]}
        return {"name": self.name, "classes": list(self.classes), "splits": splits, "inputs": inputs}


# Extraction settings (dataset.json's config) that change what a model sees.
INPUT_SETTINGS = ("spec", "fps", "frame_size", "frame_rule", "jpeg_quality", "spec_dtype")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def fingerprint_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(changes that make a model's outputs mean something else, other changes) from ``old`` to
    ``new`` fingerprints (``DatasetInfo.fingerprint``). The first: dataset name, class names or
    their order, input settings; the second: the clips (split sizes or keys), same classes."""
    changes = []
    if "name" in old and old["name"] != new.get("name"):
        changes.append(f"dataset {old.get('name')!r} -> {new.get('name')!r}")
    a, b = list(old.get("classes", [])), list(new.get("classes", []))
    if a != b:
        if len(a) != len(b):
            changes.append(f"{len(a)} classes -> {len(b)} ({', '.join(map(repr, b[:6]))}"
                           f"{', ...' if len(b) > 6 else ''})")
        else:
            moved = [f"{i}: {x!r} -> {y!r}" for i, (x, y) in enumerate(zip(a, b)) if x != y]
            changes.append(f"class names ({', '.join(moved[:4])}{', ...' if len(moved) > 4 else ''})")
    if "inputs" in old:
        x, y = _flat(old["inputs"]), _flat(new.get("inputs", {}))
        changes += [f"{k} {x.get(k)!r} -> {y.get(k)!r}" for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
    clips = []
    for split in sorted(set(old.get("splits", {})) | set(new.get("splits", {}))):
        p, q = old.get("splits", {}).get(split, {}), new.get("splits", {}).get(split, {})
        if p.get("samples") != q.get("samples"):
            clips.append(f"{split} {p.get('samples', 0)} -> {q.get('samples', 0)} samples")
        elif p.get("keys") != q.get("keys"):
            clips.append(f"{split}: other clips, same count")
    return changes, clips


def read_dataset(source, *, s3_endpoint: str | None = None, retry: Retry | None = None) -> DatasetInfo:
    """Read ``dataset.json`` and every split's ``<split>.manifest.json`` from a folder or URL."""
    if isinstance(source, DatasetInfo):
        return source
    ds = sf.open_dataset(source, s3_endpoint=s3_endpoint, retry=retry)
    return DatasetInfo(ds.location, ds.meta, ds.splits)


# -- the partition -------------------------------------------------------------------------------
def _worker_steps(steps: int, worker: int, num_workers: int) -> int:
    return steps // num_workers + (1 if worker < steps % num_workers else 0)


def plan_eval(n: int, *, rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1) -> range:
    """The sample positions (index order) one evaluation consumer reads: a contiguous block."""
    consumers = world_size * num_workers
    c = rank * num_workers + worker
    return range(c * n // consumers, (c + 1) * n // consumers)


def run_starts(entries: list, run: int) -> list[int]:
    """Positions where training runs start: every ``run`` samples and at every shard change."""
    starts, last, since = [], None, 0
    for i, e in enumerate(entries):
        if e.shard != last or since == run:
            starts.append(i)
            last, since = e.shard, 0
        since += 1
    return starts


def train_order(entries: list, *, seed: int, epoch: int, run: int) -> list[int]:
    """All sample positions in the epoch's order: runs shuffled with (seed, epoch)."""
    starts = run_starts(entries, run) + [len(entries)]
    runs = [range(a, b) for a, b in zip(starts, starts[1:])]
    random.Random(f"order:{seed}:{epoch}").shuffle(runs)
    return [i for r in runs for i in r]


def plan_train(entries: list, *, batch_size: int, steps: int, seed: int, epoch: int, run: int, rank: int = 0,
               world_size: int = 1, worker: int = 0, num_workers: int = 1) -> list[int]:
    """The sample positions one training consumer reads in an epoch (before its shuffle buffer):
    exactly ``_worker_steps(steps, worker, num_workers) × batch_size`` of them."""
    order = train_order(entries, seed=seed, epoch=epoch, run=run)
    per_rank = steps * batch_size
    if per_rank * world_size > len(order):
        raise ConfigError(f"{steps} steps × {batch_size} × {world_size} rank(s) need more than the "
                          f"{len(order)} samples of the split")
    mine = order[rank * per_rank:(rank + 1) * per_rank]
    before = sum(_worker_steps(steps, w, num_workers) for w in range(worker)) * batch_size
    return mine[before:before + _worker_steps(steps, worker, num_workers) * batch_size]


def default_run(entries: list) -> int:
    """Samples per training run: about RUN_BYTES of consecutive samples."""
    if not entries:
        return 1
    mean = sum(e.length for e in entries) / len(entries)
    return max(1, min(64, int(RUN_BYTES // max(mean, 1))))


# -- reading samples -----------------------------------------------------------------------------
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


@dataclass(slots=True)
class BadSample:
    url: str
    key: str
    message: str
    fatal: bool = False     # the dataset's metadata disagrees with its shards: stop, do not skip


def _runs(entries: list, positions, max_bytes: int = MAX_RUN_BYTES):
    """Group positions into runs of consecutive samples of one shard (one request each)."""
    run: list = []
    for i in positions:
        e = entries[i]
        if e.length > sf.MAX_SAMPLE:     # a hostile index: never allocate what it claims
            if run:
                yield run
            yield [e]
            run = []
            continue
        if run and (e.shard != run[-1].shard or e.offset != run[-1].offset + run[-1].length
                    or e.offset + e.length - run[0].offset > max_bytes):
            yield run
            run = []
        run.append(e)
    if run:
        yield run


def _keep(keep_json: bool):
    return lambda ext: ext in (sf.CLS, sf.SPEC) or bool(sf.FRAME.fullmatch(ext)) or (keep_json and ext == sf.JSON)


def read_sample_run(location: Location, run: list, *, frames: int, train: bool, rng=None, keep_json: bool = False,
                    frame_pick: str = "segment", num_classes: int | None = None):
    """Samples (or ``BadSample`` for corrupt ones) of one run of consecutive index entries, read
    with one byte-range request; each checked against its CRC-32 and parsed by shardformat. A
    valid label that is not the index line's ``label_index`` is a fatal ``BadSample``."""
    shard = run[0].shard
    url = location.url(shard)
    if run[0].length > sf.MAX_SAMPLE:
        yield BadSample(url, run[0].key, f"the sample index claims {run[0].length} bytes; not read")
        return
    start = run[0].offset
    data = location.read_range(shard, start, run[-1].offset + run[-1].length - start)
    view = memoryview(data)
    keep = _keep(keep_json)
    for e in run:
        raw = view[e.offset - start:e.offset - start + e.length]
        try:
            if zlib.crc32(raw) != e.crc32:
                raise ShardDataError("bytes do not match the CRC-32 of the sample index", check="checksum")
            s = sf.parse_sample_bytes(raw, url, e.key, keep=keep)
            sf.check_structure(s)
            if sf.parse_cls(s.members[sf.CLS], num_classes) != e.label_index:
                yield BadSample(url, e.key, f"label {bytes(s.members[sf.CLS]).decode()} in the shard but "
                                f"{e.label_index} in the sample index", fatal=True)
                continue
        except ShardDataError as err:
            if err.check == "security":     # a hostile dataset: refuse it, do not train around it
                raise ShardDataError(f"{url}: sample {e.key}: {err}", check="security", shard=shard,
                                     key=e.key) from None
            yield BadSample(url, e.key, str(err).removeprefix(f"{url}: "))
            continue
        found = s.frames
        picked = select_frames(len(found), frames, train, rng, frame_pick)
        members = {k: v for k, v in s.members.items() if not sf.FRAME.fullmatch(k)}
        yield Sample(e.key, url, members, [(sf.frame_name(i), found[i]) for i in picked])


def read_samples(stream, url: str, *, frames: int, train: bool, rng=None, keep_json: bool = False,
                 frame_pick: str = "segment"):
    """The samples of one whole shard stream (no index needed), for tools; raises on corruption."""
    for s in sf.read_shard_samples(stream, url, crc=False, keep=_keep(keep_json)):
        try:
            sf.check_structure(s)
        except ShardDataError as e:
            raise ShardDataError(f"{url}: sample {s.key}: {e}", check=e.check, shard=s.shard, key=s.key) from None
        found = s.frames
        members = {k: v for k, v in s.members.items() if not sf.FRAME.fullmatch(k)}
        yield Sample(s.key, url, members,
                     [(sf.frame_name(i), found[i]) for i in select_frames(len(found), frames, train, rng,
                                                                           frame_pick)])


# -- decoding ------------------------------------------------------------------------------------
def _empty(*shape: int, dtype=torch.float32) -> torch.Tensor:
    """An uninitialised tensor; inside a DataLoader worker it is allocated in shared memory
    (as torch's default_collate does), so handing the batch to the main process copies nothing."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    return proto.new(proto._typed_storage()._new_shared(math.prod(shape), device="cpu")).view(shape)


def decode_sample(s: Sample, *, num_classes: int | None, spec_shape=None) -> tuple[int, np.ndarray, list]:
    """(label, spectrogram, frame images) of one sample; raises ``ShardDataError`` naming it."""
    try:
        label = sf.parse_cls(s.members[sf.CLS], num_classes)
        spec = sf.parse_spec(s.members[sf.SPEC], shape=spec_shape)
        images = [sf.open_jpeg(data) for _, data in s.frames]
    except ShardDataError as e:
        raise ShardDataError(f"{s.where}: {e}", check=e.check, shard=s.url.rpartition("/")[2], key=s.key) from None
    return label, spec, images


def decode_batch(samples: list, *, train: bool, image_size: int, rng=None, per_frame: bool = False,
                 with_meta: bool = False, num_classes: int | None = None, visual_dtype=torch.float32,
                 skip_bad: bool = False, spec_shape: tuple[int, int] | None = None, segments: bool = False) -> dict:
    """Encoded samples -> ``{"audio": float32 (B,1,F,T), "visual": (B,n,3,S,S), "label": int64 (B,),
    "key": [str]}`` (+ ``"meta"``), with the safe decoders only (see the module docstring).
    ``segments``: also ``"segments"``, int64 (B, S), each sample's per-second labels
    (``shardformat.parse_segments``: -1 background); a sample without them is a bad sample.
    ``visual`` is float32 normalised, or uint8 pixels with ``visual_dtype=torch.uint8``
    (normalise with ``to_device``).

    With ``skip_bad`` a corrupt sample (or a ``BadSample`` from ``read_sample_run``) is left out of the
    batch and listed in ``batch["bad"]`` as ``BadSample``; otherwise it raises ``ShardDataError``.
    Each sample is decoded straight into its slot of the batch tensors (no per-sample tensors to
    stack); the float16 spectrogram is widened by torch, several times faster than numpy's astype.
    """
    bad = [s for s in samples if isinstance(s, BadSample)]
    samples = [s for s in samples if not isinstance(s, BadSample)]
    if bad and not skip_bad:
        raise ShardDataError(f"{bad[0].url}: sample {bad[0].key}: {bad[0].message}")
    audio = visual = None
    labels, keys, metas, segs = [], [], [], []
    j = 0
    for s in samples:
        try:
            label, spec, images = decode_sample(s, num_classes=num_classes,
                                                spec_shape=spec_shape if audio is None else tuple(audio.shape[2:]))
            if audio is None or visual is None:       # both set by the first decoded sample
                audio = _empty(len(samples), 1, *spec.shape)
                visual = _empty(len(samples), len(s.frames), 3, image_size, image_size, dtype=visual_dtype)
            audio[j, 0].copy_(torch.from_numpy(spec))
            transform_clip(images, train=train, image_size=image_size, rng=rng, per_frame=per_frame, out=visual[j])
            meta = _meta(s) if with_meta or segments else None
            if segments and meta is not None:
                seg = _segments(s, meta, num_classes, segs[0] if segs else None)
        except ShardDataError as e:
            if not skip_bad or e.check == "security":
                raise
            bad.append(BadSample(s.url, s.key, str(e).removeprefix(f"{s.where}: ")))
            continue
        labels.append(label)
        keys.append(s.key)
        metas.append(meta)
        if segments:
            segs.append(seg)
        j += 1
    if audio is None or visual is None:       # nothing decodable: an empty batch of unknown spectrogram shape
        audio = _empty(0, 1, 0, 0)
        visual = _empty(0, 0, 3, image_size, image_size, dtype=visual_dtype)
    batch = {"audio": audio[:j], "visual": visual[:j], "label": torch.tensor(labels, dtype=torch.int64),
             "key": keys}
    if with_meta:
        batch["meta"] = metas
    if segments:
        batch["segments"] = torch.tensor(segs, dtype=torch.int64).view(j, len(segs[0]) if segs else 0)
    if skip_bad:
        batch["bad"] = bad
    return batch


def _segments(s: Sample, meta: dict, num_classes: int | None, first: list | None) -> list[int]:
    try:
        seg = sf.parse_segments(meta, num_classes)
    except ShardDataError as e:
        raise ShardDataError(f"{s.where}: {e}", check=e.check, key=s.key) from None
    if seg is None:
        raise ShardDataError(f"{s.where}: no segment labels (json has neither 'segments' nor 'event')", check="json",
                             key=s.key)
    if first is not None and len(seg) != len(first):
        raise ShardDataError(f"{s.where}: {len(seg)} segments, the batch's first sample has {len(first)}",
                             check="json", key=s.key)
    return seg


def _meta(s: Sample) -> dict:
    try:
        meta = json.loads(s.members[sf.JSON]) if sf.JSON in s.members else {}
    except (ValueError, RecursionError):
        raise ShardDataError(f"{s.key}.json is not valid JSON", check="json") from None
    if not isinstance(meta, dict):
        raise ShardDataError(f"{s.key}.json is not an object", check="json")
    return meta


def to_device(batch: dict, device, *, non_blocking: bool | None = None):
    """(audio, visual, label) of a batch on ``device``; a uint8 visual batch is moved as uint8
    (4× fewer bytes) and converted and normalised there (``transforms.normalize_``)."""
    device = torch.device(device)
    nb = device.type == "cuda" if non_blocking is None else non_blocking
    visual = batch["visual"].to(device, non_blocking=nb)
    if visual.dtype == torch.uint8:
        visual = normalize_(visual.float())
    return (batch["audio"].to(device, non_blocking=nb), visual, batch["label"].to(device, non_blocking=nb).long())


# -- the dataset and loader ----------------------------------------------------------------------
class ShardStream(torch.utils.data.IterableDataset):
    """Batches of one split for one rank; each DataLoader worker reads its own samples
    (``plan_eval`` / ``plan_train``) as byte-range runs, shuffles them (training) and decodes each
    batch straight into (shared-memory) batch tensors."""

    def __init__(self, location: Location, entries: list, *, train: bool, batch_size: int, frames: int,
                 image_size: int, seed: int, epoch: int, rank: int, world_size: int, num_workers: int,
                 shuffle_buffer: int, drop_last: bool, steps: int | None, run: int, num_classes: int,
                 per_frame: bool = False, with_meta: bool = False, visual_dtype=torch.float32,
                 spec_shape: tuple[int, int] | None = None, frame_pick: str = "segment", segments: bool = False):
        super().__init__()
        self.location, self.entries = location, entries
        self.train, self.batch_size, self.frames, self.image_size = train, batch_size, frames, image_size
        self.seed, self.rank, self.world_size, self.num_workers = seed, rank, world_size, num_workers
        self.shuffle_buffer, self.drop_last, self.steps, self.run = shuffle_buffer, drop_last, steps, run
        self.num_classes, self.per_frame, self.with_meta, self.visual_dtype = \
            num_classes, per_frame, with_meta, visual_dtype
        self.spec_shape, self.frame_pick, self.segments = spec_shape, frame_pick, segments
        # shared with (persistent) workers so set_epoch reaches them
        self.epoch = mp.RawValue("q", epoch)

    def positions(self, worker: int, epoch: int) -> list[int]:
        if self.train:
            assert self.steps is not None       # make_loader gives a training stream its steps
            return plan_train(self.entries, batch_size=self.batch_size, steps=self.steps, seed=self.seed,
                              epoch=epoch, run=self.run, rank=self.rank, world_size=self.world_size,
                              worker=worker, num_workers=self.num_workers)
        return list(plan_eval(len(self.entries), rank=self.rank, world_size=self.world_size, worker=worker,
                              num_workers=self.num_workers))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        epoch = self.epoch.value
        tag = f"{self.seed}:{epoch}:{self.rank}:{worker}"
        frame_rng = random.Random(f"frames:{tag}")
        positions = self.positions(worker, epoch)
        samples = (s for run in _runs(self.entries, positions)
                   for s in read_sample_run(self.location, run, frames=self.frames, train=self.train, rng=frame_rng,
                                            keep_json=self.with_meta or self.segments, frame_pick=self.frame_pick,
                                            num_classes=self.num_classes))
        if self.train:
            samples = _shuffled(samples, self.shuffle_buffer, random.Random(f"buffer:{tag}"))
        decode = partial(decode_batch, train=self.train, image_size=self.image_size, rng=random.Random(f"aug:{tag}"),
                         per_frame=self.per_frame, with_meta=self.with_meta, num_classes=self.num_classes,
                         visual_dtype=self.visual_dtype, skip_bad=True, spec_shape=self.spec_shape,
                         segments=self.segments)
        batches = _batched(samples, self.batch_size, partial=not self.drop_last)
        return (self._with_notes(decode(b)) for b in batches)

    def _with_notes(self, batch: dict) -> dict:
        """What the location asked to tell (``Location.notes``) travels with the next batch."""
        if self.location.notes:
            batch["notes"] = list(self.location.notes)
            self.location.notes.clear()
        return batch


def _shuffled(samples, size: int, rng: random.Random):
    """A shuffle buffer of ``size`` samples (``size`` <= 1: no shuffle)."""
    if size <= 1:
        yield from samples
        return
    buf: list = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = rng.randrange(len(buf))
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


def _batched(samples, n: int, partial: bool):
    it = iter(samples)
    while batch := list(islice(it, n)):
        if len(batch) == n or partial:
            yield batch


class ShardLoader:
    """Iterable of batches for one split and rank; ``len()`` is its number of batches per epoch.

    ``set_epoch(e)`` reseeds the next iteration (works with persistent workers too). Corrupt
    samples reported by the workers are passed to ``on_bad_sample(url, key, message)`` here, in
    the main process; past ``max_bad`` of them (per loader, all epochs) it raises ``DataError``.
    """

    def __init__(self, stream: ShardStream, loader: torch.utils.data.DataLoader, num_batches: int,
                 num_samples: int, info: DatasetInfo, on_bad_sample: Callable | None = None, max_bad: int = 0,
                 on_warning: Callable[[str], None] | None = None):
        self.stream, self.loader, self.info = stream, loader, info
        self.num_batches, self.num_samples = num_batches, num_samples
        self.on_bad_sample, self.max_bad, self.on_warning = on_bad_sample, max_bad, on_warning
        self.bad: list[BadSample] = []
        self.warned: set[str] = set()

    @property
    def steps_per_epoch(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.stream.epoch.value = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        for batch in self.loader:
            for note in batch.pop("notes", ()):      # each worker says it once: pass it on once
                if note not in self.warned:
                    self.warned.add(note)
                    if self.on_warning is not None:
                        self.on_warning(note)
            for b in batch.pop("bad", ()):
                if b.fatal:
                    raise ShardDataError(f"{b.url}: sample {b.key}: {b.message}", check="index",
                                         shard=b.url.rpartition("/")[2], key=b.key)
                self.bad.append(b)
                if self.on_bad_sample is not None:
                    self.on_bad_sample(b.url, b.key, b.message)
                if len(self.bad) > self.max_bad:
                    raise DataError(f"{b.url}: sample {b.key}: {b.message} ({len(self.bad)} corrupt samples, "
                                    f"more than the {self.max_bad} allowed)")
            if not batch["key"]:
                if not self.stream.train:
                    continue        # evaluation has no per-batch collectives: nothing to keep in step
                raise DataError(f"every sample of a batch is corrupt (last: {self.bad[-1].url}: "
                                f"sample {self.bad[-1].key}: {self.bad[-1].message})")
            yield batch


def default_steps_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """floor(samples / (batch × ranks)): one epoch sees every sample once across ranks, except
    the last partial global batch."""
    return num_samples // (batch_size * world_size)


def make_loader(source, split: str, *, train: bool, batch_size: int, frames: int, image_size: int = 224,
                workers: int = 2, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                shuffle_buffer: int = 1000, s3_endpoint: str | None = None, drop_last: bool | None = None,
                steps_per_epoch: int | None = None, pin_memory: bool = False, persistent_workers: bool = False,
                prefetch_factor: int | None = None, per_frame: bool = False, with_meta: bool = False,
                retry: Retry | None = None, visual_dtype: torch.dtype = torch.float32,
                on_bad_sample: Callable[[str, str, str], None] | None = None,
                max_bad_samples: float = 0.01, run: int | None = None, frame_pick: str = "segment",
                segments: bool = False, on_warning: Callable[[str], None] | None = None) -> ShardLoader:
    """A loader over ``split`` of ``source`` (folder, URL, or a ``DatasetInfo`` from read_dataset).
    ``segments``: batches also hold ``"segments"`` (B, S) per-second labels (AVE localisation).

    Batches: ``{"audio": float32 (B,1,F,T) ((B,1,T,mel) for fbank), "visual": (B,n,3,S,S) float32
    normalised, or uint8 with ``visual_dtype=torch.uint8`` (then use ``to_device``), "label":
    int64 (B,), "key": [str]}``. Any ``world_size × workers`` works on any shard count (the module
    docstring gives the partition). Training yields exactly ``steps_per_epoch`` batches on every
    rank (default: floor(split samples / (batch_size × world_size))), each sample at most once.
    Evaluation yields every sample of the split exactly once across ranks and workers (partial
    batches kept unless ``drop_last``); ranks may get different batch counts, so reduce eval
    metrics with sums, not per-batch collectives. A corrupt sample is skipped (its batch is
    smaller) and reported to ``on_bad_sample(url, key, message)``; more than ``max_bad_samples``
    (a fraction of this rank's samples per epoch when < 1, else a count) raises ``DataError``.
    The shuffle buffer holds encoded samples: each training worker keeps up to ``shuffle_buffer``
    × (spectrogram + selected JPEG bytes) in memory. ``frame_pick`` chooses a clip's ``frames``
    frames (``transforms.select_frames``: per segment, or the reference code's fixed rules).
    """
    info = read_dataset(source, s3_endpoint=s3_endpoint, retry=retry)
    info.split(split)
    if batch_size < 1 or frames < 1 or image_size < 1:
        raise ConfigError(f"batch size, frames and image size must be positive "
                          f"(got {batch_size}, {frames}, {image_size})")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world size {world_size}")
    entries = info.index(split)
    num_workers = max(workers, 1)
    drop_last = train if drop_last is None else drop_last
    if train:
        steps = steps_per_epoch if steps_per_epoch is not None else \
            default_steps_per_epoch(len(entries), batch_size, world_size)
        if steps < 1:
            raise ConfigError(f"split {split!r} has {len(entries)} samples, fewer than one batch of "
                              f"{batch_size} × {world_size} rank(s): lower --batch-size")
        if steps * batch_size * world_size > len(entries):
            raise ConfigError(f"split {split!r} has {len(entries)} samples, fewer than {steps} steps × "
                              f"{batch_size} × {world_size} rank(s)")
        # a worker with no batch would only cost start-up time
        workers = min(workers, steps)
        num_workers = max(workers, 1)
        num_batches, num_samples = steps, steps * batch_size
    else:
        n_rank = len(plan_eval(len(entries), rank=rank, world_size=world_size, worker=0, num_workers=1))
        workers = min(workers, n_rank)
        num_workers = max(workers, 1)
        steps, num_batches, num_samples = None, 0, 0
        for w in range(num_workers):
            n = len(plan_eval(len(entries), rank=rank, world_size=world_size, worker=w, num_workers=num_workers))
            num_samples += n
            num_batches += n // batch_size if drop_last else math.ceil(n / batch_size)
    max_bad = int(max_bad_samples * num_samples) if max_bad_samples < 1 else int(max_bad_samples)
    stream = ShardStream(info.location, entries, train=train, batch_size=batch_size, frames=frames,
                         image_size=image_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                         num_workers=num_workers, shuffle_buffer=shuffle_buffer, drop_last=drop_last,
                         steps=steps, run=run or default_run(entries), num_classes=info.num_classes,
                         per_frame=per_frame, with_meta=with_meta, visual_dtype=visual_dtype,
                         spec_shape=info.meta.spec_shape, frame_pick=frame_pick, segments=segments)
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor or 2}
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                         **extra)
    return ShardLoader(stream, loader, num_batches, num_samples, info, on_bad_sample, max_bad,
                       on_warning or info.on_warning)


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
