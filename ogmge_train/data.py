"""Streaming shards (SPEC §4) into batches for training and evaluation (SPEC §5).

Built on webdataset's pipeline pieces (``DataPipeline``, ``group_by_keys``, ``shuffle``,
``batched``); the shards themselves are opened through ``avprep.storage``, so a local folder,
``http(s)://`` and ``s3://`` share one retry/resume logic.

Safety: shards are untrusted. Only these decoders exist: ``cls`` -> int, ``json`` -> dict,
``spec.npy`` -> ``np.load(allow_pickle=False)``, ``fNNN.jpg`` -> PIL, and only for the frames
selected for the batch. A pickle member (``.pyd``, ``.pickle``, ``.pkl``, ``.pth``, ``.pt``) or a
pickled ``.npy`` raises ``ShardDataError`` naming the shard and key; webdataset's auto-decoders
(which unpickle) are never used.

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
import tarfile
import time
from dataclasses import dataclass, field
from functools import partial
from itertools import islice

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys

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


# -- pipeline stages -----------------------------------------------------------------------------
def _train_samples(location: Location, shards: list[str], shuffle, rng: random.Random):
    """Endless passes over this worker's shards, each pass in a new seeded shard order and
    shuffled on its own (so a small worker's buffer never holds two copies of a sample)."""
    while True:
        order = list(shards)
        rng.shuffle(order)
        n = 0
        for sample in shuffle(group_by_keys(_expand_tars(location, ({"url": name} for name in order)))):
            n += 1
            yield sample
        if n == 0:
            raise ShardDataError(f"{location.url(order[0])}: the shards of this worker hold no samples")


def _expand_tars(location: Location, src):
    """webdataset-style file records ({"fname", "data", "__url__"}), ``{}`` after each shard."""
    for item in src:
        url = location.url(item["url"])
        with location.open(item["url"]) as stream:
            try:
                with tarfile.open(fileobj=stream, mode="r|*") as tar:
                    for member in tar:
                        if member.isreg():
                            yield {"fname": member.name, "data": tar.extractfile(member).read(), "__url__": url}
            except tarfile.TarError as e:
                raise ShardDataError(f"{url}: not a readable tar shard ({e})") from None
        yield {}


def decode_sample(sample: dict, *, frames: int, train: bool, image_size: int, rng, per_frame: bool = False,
                  with_meta: bool = False) -> dict:
    """One grouped tar sample -> tensors, with the safe decoders only (see module docstring)."""
    url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
    where = f"{url}: sample {key}"
    members = [k for k in sample if not k.startswith("__")]
    for ext in members:
        if ext.rsplit(".", 1)[-1] in _PICKLE_EXTS:
            raise ShardDataError(f"{where}: member {key}.{ext} is a pickle; refusing to unpickle untrusted shards")
    for need in ("cls", "spec.npy"):
        if need not in sample:
            raise ShardDataError(f"{where}: missing member {key}.{need}")
    try:
        label = int(sample["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ShardDataError(f"{where}: {key}.cls is not an ASCII integer") from None
    try:
        spec = np.load(io.BytesIO(sample["spec.npy"]), allow_pickle=False)
    except ValueError as e:
        raise ShardDataError(f"{where}: {key}.spec.npy is not a plain array ({e})") from None
    if spec.ndim != 2 or spec.dtype.kind != "f":
        raise ShardDataError(f"{where}: {key}.spec.npy has shape {spec.shape} dtype {spec.dtype}; "
                             "expected a 2-D float array")
    frame_names = sorted((m for m in members if _FRAME.fullmatch(m)), key=lambda m: int(_FRAME.fullmatch(m)[1]))
    if not frame_names:
        raise ShardDataError(f"{where}: no frames ({key}.f000.jpg ...)")
    images = []
    for i in select_frames(len(frame_names), frames, train, rng):  # decode only these
        try:
            im = Image.open(io.BytesIO(sample[frame_names[i]]), formats=["JPEG"])
            im.load()
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
            raise ShardDataError(f"{where}: {key}.{frame_names[i]} is not a readable JPEG ({e})") from None
        images.append(im)
    out = {"audio": torch.from_numpy(spec.astype(np.float32))[None],
           "visual": transform_clip(images, train=train, image_size=image_size, rng=rng, per_frame=per_frame),
           "label": label, "key": key}
    if with_meta:
        try:
            out["meta"] = json.loads(sample["json"]) if "json" in sample else {}
        except ValueError:
            raise ShardDataError(f"{where}: {key}.json is not valid JSON") from None
    return out


def collate(samples: list[dict]) -> dict:
    """Stack decoded samples: audio (B,1,F,T), visual (B,n,3,S,S), label int64 (B,), key list."""
    shapes = {tuple(s["audio"].shape) for s in samples}
    if len(shapes) > 1:
        raise ShardDataError(f"spectrogram shapes differ within a batch: {sorted(shapes)} "
                             f"(keys {samples[0]['key']} ...)")
    batch = {"audio": torch.stack([s["audio"] for s in samples]),
             "visual": torch.stack([s["visual"] for s in samples]),
             "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
             "key": [s["key"] for s in samples]}
    if "meta" in samples[0]:
        batch["meta"] = [s["meta"] for s in samples]
    return batch


# -- the dataset and loader ----------------------------------------------------------------------
class ShardStream(torch.utils.data.IterableDataset):
    """Batches of one split for one rank; each DataLoader worker reads its own shards."""

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
        decode = partial(decode_sample, frames=self.frames, train=self.train, image_size=self.image_size,
                         rng=random.Random(f"aug:{tag}"), per_frame=self.per_frame, with_meta=self.with_meta)
        if self.train:
            if not mine:
                return iter(())
            steps = _worker_steps(self.steps, worker, self.num_workers)
            shuffle = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100),
                                  rng=random.Random(f"buffer:{tag}"))
            pipeline = wds.DataPipeline(
                partial(_train_samples, self.location, mine, shuffle, random.Random(f"shards:{tag}")),
                wds.map(decode), wds.batched(self.batch_size, collation_fn=collate, partial=False),
                lambda src: islice(src, steps))
        else:
            pipeline = wds.DataPipeline(
                partial(iter, [{"url": name} for name in mine]), partial(_expand_tars, self.location), group_by_keys,
                wds.map(decode), wds.batched(self.batch_size, collation_fn=collate, partial=not self.drop_last))
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
