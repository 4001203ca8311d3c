"""The typed files next to the shards: ``<split>.manifest.json`` (``Manifest``), the sample index
``<split>.samples.jsonl`` (``SampleIndex`` of ``IndexEntry``), ``<split>.wids.json`` and
``dataset.json`` (``DatasetMeta``), each read by one ``from_json`` that checks it and written by
one ``to_json``.

The sample index gives, per sample, the byte offset of its first tar header inside its shard, its
total length (headers, payloads, padding: up to the next sample's first header) and the CRC-32 of
those bytes, so a reader can fetch any run of samples with one byte-range request and check each
sample before decoding it."""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TypeGuard

from .errors import ShardDataError
from .names import SHARD_NAME, index_name, manifest_name, wids_name


def _need(cond: bool, where: str, what: str, check: str = "manifest") -> None:
    if not cond:
        raise ShardDataError(f"{where}: {what}", check=check, shard=where.rpartition("/")[2])


def load_json(data: bytes, where: str, check: str = "manifest"):
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ShardDataError(f"{where}: not valid JSON ({type(e).__name__}: {str(e)[:80]})", check=check,
                             shard=where.rpartition("/")[2]) from None


def dump_json(obj, indent: int | None = None) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=indent, ensure_ascii=False,
                       separators=(",", ": ") if indent else (",", ":")) + "\n").encode("utf-8")


def check_shard_name(name, split: str, where: str) -> str:
    if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
        # never open a name like "../x.tar": it could point outside the dataset
        raise ShardDataError(f"{where}: refusing shard name {name!r}"[:300], check="security",
                             shard=where.rpartition("/")[2])
    if not name.startswith(f"{split}-"):
        raise ShardDataError(f"{where}: shard {name} does not belong to split {split}", check="manifest",
                             shard=where.rpartition("/")[2])
    return name


@dataclass(frozen=True)
class ShardEntry:
    name: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """``<split>.manifest.json``."""

    split: str
    num_samples: int
    class_counts: dict[str, int]
    shards: list[ShardEntry]

    def to_json(self) -> bytes:
        return dump_json({"split": self.split, "num_samples": self.num_samples,
                          "class_counts": self.class_counts, "shards": [asdict(s) for s in self.shards]}, indent=1)

    @classmethod
    def from_json(cls, data: bytes, split: str, where: str) -> Manifest:
        m = load_json(data, where)
        _need(isinstance(m, dict) and isinstance(m.get("shards"), list), where, "no shard list")
        _need(m.get("split") == split, where, f"split is {str(m.get('split'))[:40]!r}, expected {split!r}")
        _need(_is_int(m.get("num_samples")), where, "num_samples missing")
        shards = []
        for e in m["shards"]:
            _need(isinstance(e, dict) and _is_int(e.get("num_samples")) and _is_int(e.get("bytes"))
                  and isinstance(e.get("sha256"), str), where, f"malformed shard entry {str(e)[:120]}")
            shards.append(ShardEntry(check_shard_name(e.get("name"), split, where), e["num_samples"],
                                     e["bytes"], e["sha256"]))
        listed = sum(s.num_samples for s in shards)
        _need(listed == m["num_samples"], where, f"num_samples {m['num_samples']} but shards list {listed}")
        counts = m.get("class_counts") or {}
        _need(isinstance(counts, dict) and all(_is_int(v) for v in counts.values()), where, "malformed class_counts")
        return cls(split, m["num_samples"], dict(counts), shards)


def _is_int(v) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


@dataclass(frozen=True)
class IndexEntry:
    """One line of ``<split>.samples.jsonl``: the sample and where its bytes are."""

    key: str
    label: str
    label_index: int
    shard: str
    source: str
    duration: float
    offset: int
    length: int
    crc32: int
    n_frames: int = 0

    def to_dict(self) -> dict:
        # not dataclasses.asdict: its deep copy of every value showed in profiles (one per sample)
        return {f: getattr(self, f) for f in _ENTRY_FIELDS}


_ENTRY_FIELDS = tuple(f.name for f in fields(IndexEntry))
INDEX_FIELDS = ("offset", "length", "crc32")


@dataclass
class SampleIndex:
    """``<split>.samples.jsonl``: samples in shard order, then tar order."""

    split: str
    entries: list[IndexEntry]

    def to_json(self) -> bytes:
        return b"".join(dump_json(e.to_dict()) for e in self.entries)

    @classmethod
    def from_json(cls, data: bytes, split: str, where: str) -> SampleIndex:
        entries = []
        for n, line in enumerate(bytes(data).splitlines(), 1):
            if not line.strip():
                continue
            r = load_json(line, f"{where} line {n}", check="index")
            at = f"{where} line {n}"
            _need(isinstance(r, dict) and isinstance(r.get("key"), str) and isinstance(r.get("shard"), str),
                  at, "not a sample record", "index")
            missing = [f for f in INDEX_FIELDS if f not in r]
            if missing:
                raise ShardDataError(f"{where}: no byte offsets in the sample index (written by an older "
                                     f"avprep); add them with `avprep index OUT`", check="index",
                                     shard=where.rpartition("/")[2])
            _need(all(_is_int(r.get(f)) for f in (*INDEX_FIELDS, "label_index")), at, "malformed offsets", "index")
            check_shard_name(r["shard"], split, at)
            entries.append(cls._entry(r))
        return cls(split, entries)

    @staticmethod
    def _entry(r: dict) -> IndexEntry:
        n = r.get("n_frames")
        return IndexEntry(r["key"], str(r.get("label", "")), r["label_index"], r["shard"], str(r.get("source", "")),
                          float(r.get("duration") or 0.0), r["offset"], r["length"], r["crc32"],
                          n if _is_int(n) else 0)

    @classmethod
    def from_records(cls, split: str, records: list[dict]) -> SampleIndex:
        """From the writer's records (trusted: written by this process)."""
        return cls(split, [cls._entry(r) for r in records])

    def by_shard(self) -> dict[str, list[IndexEntry]]:
        out: dict[str, list[IndexEntry]] = {}
        for e in self.entries:
            out.setdefault(e.shard, []).append(e)
        return out


def index_records(data: bytes, where: str) -> dict[str, dict]:
    """The records of a sample index by key, with or without byte offsets (an older avprep
    wrote none), lines that are no record skipped: for re-indexing, which keeps their fields."""
    records = {}
    for line in bytes(data).splitlines():
        r = load_json(line, where, check="index") if line.strip() else None
        if isinstance(r, dict) and isinstance(r.get("key"), str):
            records[r["key"]] = r
    return records


@dataclass
class DatasetMeta:
    """``dataset.json``: classes, splits (sample counts), extraction config, tool version, and the
    shape facts a schema needs (``spec_shape``, ``spec_dtype``, ``frame_size``, ``max_frames``,
    frame histogram). ``from_json`` checks every one of them, so whoever opens a dataset sees
    the same verdict on it."""

    name: str
    classes: list[str]
    splits: dict[str, int]
    config: dict
    raw: dict
    spec_shape: tuple[int, int]

    @property
    def spec_dtype(self) -> str:
        return str(self.config.get("spec_dtype", "float16"))

    @property
    def frame_size(self) -> int:
        """The frames' short side (0: kept as decoded)."""
        return self.config.get("frame_size", 0)

    @property
    def max_frames(self) -> int | None:
        v = self.raw.get("max_frames")
        return v if _is_int(v) else None

    def to_json(self) -> bytes:
        return dump_json(self.raw, indent=1)

    @classmethod
    def build(cls, options: dict, classes: list[str], manifests: dict[str, Manifest], records: list[dict],
              num_failures: int, spec_shape: tuple[int, int], extra: dict | None = None) -> DatasetMeta:
        """dataset.json of a finished extraction: ``options`` (name, config, tool_version), the
        classes, split sizes, spectrogram shape and dtype, frame counts, and ``extra`` facts about
        the source that are not options (``split_registry``, the download's ``availability``)."""
        config = options.get("config", {})
        raw = {**options, "classes": list(classes),
               "splits": {s: m.num_samples for s, m in manifests.items()}, "num_failures": num_failures,
               "spec_shape": list(spec_shape),
               "spec_dtype": config.get("spec_dtype", "float16"),
               **frame_stats(r.get("n_frames", 0) for r in records), **(extra or {})}
        return cls(str(options.get("name", "")), list(classes), dict(raw["splits"]), config, raw,
                   (spec_shape[0], spec_shape[1]))

    @classmethod
    def from_json(cls, data: bytes, where: str) -> DatasetMeta:
        d = load_json(data, where)
        _need(isinstance(d, dict), where, "not a JSON object")
        classes = d.get("classes")
        _need(isinstance(classes, list) and bool(classes) and all(isinstance(c, str) for c in classes),
              where, "no 'classes' list of names")
        splits = d.get("splits")
        if isinstance(splits, list):
            splits = {s: 0 for s in splits}
        _need(isinstance(splits, dict) and all(isinstance(s, str) and s and "/" not in s and "\0" not in s
                                               for s in splits), where, "no 'splits'")
        config = d.get("config", {})
        _need(isinstance(config, dict), where, "'config' is not an object")
        _need(_is_int(config.get("frame_size", 0)), where, f"frame_size {str(config.get('frame_size'))[:40]} "
              "is not a size")
        dtype = config.get("spec_dtype", "float16")
        _need(dtype in ("float16", "float32"), where, f"spec_dtype {str(dtype)[:40]!r} is not float16 or float32")
        return cls(str(d.get("name", "")), list(classes), {s: int(v) if _is_int(v) else 0 for s, v in splits.items()},
                   config, d, _spec_shape(d, config, where))


def _spec_shape(d: dict, config: dict, where: str) -> tuple[int, int]:
    """The spectrogram shape of dataset.json: the one its spec config gives (a recorded
    ``spec_shape`` must agree), or, written by another tool (no spec config), the recorded one."""
    recorded = d.get("spec_shape")
    _need(recorded is None or (isinstance(recorded, list) and len(recorded) == 2 and all(_is_int(x) for x in recorded)),
          where, f"spec_shape {str(recorded)[:40]} is not a 2-D shape")
    if "spec" not in config:
        if recorded is None:
            raise ShardDataError(f"{where}: no spectrogram shape (neither spec_shape nor config.spec)",
                                 check="manifest", shard=where.rpartition("/")[2])
        return (recorded[0], recorded[1])
    from ..config import SpecConfig

    try:
        shape = SpecConfig(**config["spec"]).shape
    except Exception as e:  # noqa: BLE001 - hostile values raise TypeError, ZeroDivisionError, ConfigError ...
        raise ShardDataError(f"{where}: config.spec gives no spectrogram shape ({type(e).__name__}: {str(e)[:80]})",
                             check="manifest", shard=where.rpartition("/")[2]) from None
    _need(recorded is None or tuple(recorded) == shape, where,
          f"spec_shape {recorded} but the spec config gives {list(shape)}")
    return shape


def frame_stats(frame_counts: Iterable[int]) -> dict:
    """``max_frames`` and the frame-count histogram for dataset.json."""
    hist = Counter(frame_counts)
    return {"max_frames": max(hist, default=0), "frame_histogram": {str(k): hist[k] for k in sorted(hist)}}


def wids_index(split: str, shards: list[ShardEntry], base: str = "") -> bytes:
    """``<split>.wids.json``: the shard list wids reads (relative urls resolve next to the file)."""
    return dump_json({"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": split,
                      "shardlist": [{"url": base + s.name, "nsamples": s.num_samples, "filesize": s.bytes}
                                    for s in shards]}, indent=1)


def write_split_files(out, split: str, index: SampleIndex, shards: list[ShardEntry], classes: list[str],
                      write) -> Manifest:
    """The sample index, wids index and manifest of one split, in that order (the manifest names the
    shards, so it comes last). ``write(path, bytes)`` writes one file atomically."""
    out = Path(out)
    counts = Counter(e.label for e in index.entries)
    manifest = Manifest(split, len(index.entries), {c: counts[c] for c in classes if c in counts}, shards)
    write(out / index_name(split), index.to_json())
    write(out / wids_name(split), wids_index(split, shards))
    write(out / manifest_name(split), manifest.to_json())
    return manifest
