"""Verify an extracted dataset (SPEC §4) without trusting it.

Shards come from outside, so every check treats them as hostile: tar members are read as
bytes and never extracted to disk, ``.npy`` headers are inspected before loading (and loaded
with ``allow_pickle=False``), pickle-like members are reported and never opened. Each shard
is read once as a stream: the same pass hashes it and parses its samples, so remote shards
(HTTP, S3) are not downloaded twice.

Problems are values (:class:`Problem`), never exceptions; only "this is not a dataset at
all" (missing folder, no dataset.json) raises :class:`~avprep.errors.ConfigError`.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import storage
from .config import SpecConfig
from .errors import ConfigError, StorageError
from .shards import TMP_MARK, split_order
from .storage import Location

_FRAME = re.compile(r"^f(\d{3,})\.jpg$")
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_]+(?:-[A-Za-z0-9_]+)*-\d{6}\.tar$")
# Members whose only use is to be unpickled (or that are pickles in disguise).
_PICKLE_EXTS = {"pyd", "pickle", "pkl", "pt", "pth", "ckpt"}
_NPY_MAGIC = b"\x93NUMPY"
_MAX_MEMBER_BYTES = 256 * 2**20      # bigger than any real member; guards memory
_CHUNK = 1 << 20
_MAX_PIXELS = 64 * 2**20            # a frame this large is an attack (or not ours); not decoded
_ENTRY_TYPES = {"name": str, "num_samples": int, "bytes": int, "sha256": str}
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")     # object addresses would make reports differ run to run


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong. ``shard`` / ``key`` are "" when the problem is not about one."""

    shard: str
    key: str
    check: str
    message: str


@dataclass
class VerifyReport:
    location: str
    quick: bool
    num_shards: int = 0          # shards listed in the manifests
    num_samples: int = 0         # samples read from shards (manifest counts when quick)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def security_problems(self) -> list[Problem]:
        return [p for p in self.problems if p.check == "security"]

    def to_dict(self) -> dict:
        return {
            "location": self.location,
            "quick": self.quick,
            "ok": self.ok,
            "num_shards": self.num_shards,
            "num_samples": self.num_samples,
            "problems": [asdict(p) for p in self.problems],
        }


def _open_location(location, s3_endpoint: str | None) -> Location:
    if isinstance(location, Location):
        return location
    text = str(location)
    if "://" not in text and not Path(text).is_dir():
        raise ConfigError(f"{text}: no such folder")
    return storage.open_location(text, s3_endpoint=s3_endpoint)


ProgressFn = Callable[[int, int, str], None]


def verify(location, *, quick: bool = False, on_progress: ProgressFn | None = None,
           s3_endpoint: str | None = None) -> VerifyReport:
    """Check every shard of the dataset at ``location`` against its manifest and the schema.

    ``location`` is a folder, an ``http(s)://`` or ``s3://`` prefix (``s3_endpoint`` for
    S3-compatible servers), or an :class:`avprep.storage.Location`.
    ``quick`` checks only presence, size, sha256 of each shard (still reading every byte,
    but decoding nothing). ``on_progress(done, total, shard)`` is called after each shard.
    Order of problems is deterministic: splits train, val, test (then others), shards in
    manifest order, samples in tar order. Shards are checked one after another: decoding
    every JPEG dominates, and keys must be compared across all shards anyway.
    Raises ConfigError when there is no dataset.json at all.
    """
    loc = _open_location(location, s3_endpoint)
    report = VerifyReport(location=str(location) if isinstance(location, (str, Path)) else _root_url(loc),
                          quick=quick)
    problems = report.problems
    dataset = _read_json(loc, "dataset.json", problems)
    if dataset is None:
        return report
    schema = _Schema.from_dataset(dataset, problems)
    if schema is None:
        return report
    manifests, shards = _read_manifests(loc, schema.splits, problems)
    report.num_shards = len(shards)
    _check_strays(loc, {e["name"] for _, e in shards}, problems)
    seen = _Seen()
    for done, (split, entry) in enumerate(shards, 1):
        report.num_samples += _check_shard(loc, split, entry, schema, quick, seen, problems)
        if on_progress:
            on_progress(done, len(shards), entry["name"])
    if not quick:
        _check_class_counts(manifests, shards, seen, schema, problems)
    return report


@dataclass
class _Seen:
    """What the shards held so far: where each key was first seen, labels per split."""

    keys: dict[str, tuple[str, str]] = field(default_factory=dict)     # key -> (split, shard)
    labels: dict[str, Counter] = field(default_factory=dict)           # split -> label index counts


def _check_class_counts(manifests: dict, shards, seen: _Seen, schema, problems) -> None:
    """Manifest class counts against the labels read, for splits whose shards all read cleanly
    (a missing or broken shard would only repeat itself here)."""
    troubled = {p.shard for p in problems}
    for split, man in manifests.items():
        if any(e["name"] in troubled for s, e in shards if s == split):
            continue
        counts = seen.labels.get(split, Counter())
        actual = {schema.classes[i]: n for i, n in sorted(counts.items())}
        listed = man.get("class_counts")
        if isinstance(listed, dict) and {k: v for k, v in listed.items() if v} != actual:
            problems.append(Problem(f"{split}.manifest.json", "", "class_counts",
                                    f"class_counts {listed} but the shards hold {actual}"))


# ---------------------------------------------------------------- dataset.json, manifests


def _root_url(loc: Location) -> str:
    return loc.url("dataset.json").rpartition("/")[0] or "."


def _read_json(loc: Location, name: str, problems: list[Problem]):
    try:
        raw = loc.read_bytes(name)
    except (StorageError, OSError) as e:
        if name == "dataset.json":
            raise ConfigError(f"not an avprep dataset (an extraction writes dataset.json last): "
                              f"cannot read {e}") from None
        problems.append(Problem(name, "", "manifest", f"cannot read: {e}"))
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        problems.append(Problem(name, "", "manifest", f"not valid JSON: {e}"))
        return None


@dataclass
class _Schema:
    """What dataset.json says every sample must look like."""

    classes: list[str]
    splits: list[str]
    spec_shape: tuple[int, int]
    spec_dtype: str
    frame_size: int

    @classmethod
    def from_dataset(cls, ds, problems: list[Problem]) -> _Schema | None:
        try:
            cfg = ds["config"]
            spec = SpecConfig(**cfg["spec"])
            splits = split_order(ds["splits"])      # a list, or {"train": count, ...}
            return cls(list(ds["classes"]), splits, spec.shape, cfg.get("spec_dtype", "float16"),
                       int(cfg.get("frame_size", 0)))
        except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as e:
            problems.append(Problem("dataset.json", "", "manifest", f"unexpected content: {e!r}"))
            return None


def _read_manifests(loc: Location, splits: list[str], problems: list[Problem]):
    """({split: manifest}, [(split, shard entry)]) for every well-formed manifest and entry."""
    manifests, out = {}, []
    for split in splits:
        name = f"{split}.manifest.json"
        man = _read_json(loc, name, problems)
        if man is None:
            continue
        bad = _manifest_problem(man, split)
        if bad:
            problems.append(Problem(name, "", "manifest", bad))
            continue
        manifests[split] = man
        for entry in man["shards"]:
            shard = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(shard, str) or not _SHARD_NAME.match(shard):
                # never open a name like "../x.tar": it could point outside the dataset
                problems.append(Problem(name, "", "security", f"refusing shard name {shard!r}"))
            elif not shard.startswith(f"{split}-"):
                problems.append(Problem(name, "", "manifest", f"shard {shard} does not belong to split {split}"))
            else:
                out.append((split, entry))
        listed = sum(e["num_samples"] for e in man["shards"])
        if listed != man["num_samples"]:
            problems.append(Problem(name, "", "manifest",
                                    f"num_samples {man['num_samples']} but shards list {listed}"))
    return manifests, out


def _check_strays(loc, listed: set[str], problems):
    """Shard-like files no manifest lists: leftovers of an interrupted or older run."""
    if not isinstance(loc, storage.LocalLocation):
        return      # remote prefixes are not listed: only what the manifests name is read
    for name in sorted(p.name for p in loc.root.iterdir() if p.is_file()):
        if TMP_MARK in name:
            problems.append(Problem(name, "", "stray", "temporary file of an interrupted write"))
        elif name.endswith(".tar") and name not in listed:
            problems.append(Problem(name, "", "stray", "shard not listed in any manifest"))


def _manifest_problem(man, split: str) -> str:
    if not isinstance(man, dict) or not isinstance(man.get("shards"), list):
        return "no shard list"
    if man.get("split") != split:
        return f"split is {man.get('split')!r}, expected {split!r}"
    if not isinstance(man.get("num_samples"), int):
        return "num_samples missing"
    for e in man["shards"]:
        if not isinstance(e, dict) or not all(isinstance(e.get(k), t) for k, t in _ENTRY_TYPES.items()):
            return f"malformed shard entry {e!r}"[:200]
    return ""


# ---------------------------------------------------------------- one shard


def _exists(loc: Location, name: str) -> bool:
    try:
        return loc.exists(name)
    except (StorageError, OSError):
        return True     # unknown: report it as unreadable rather than missing


class _HashingReader(io.RawIOBase):
    """Counts and hashes bytes as tarfile reads them, so one pass does both."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def readable(self):
        return True

    def read(self, n=-1):
        data = self.f.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def readinto(self, b):
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def drain(self):
        while self.read(_CHUNK):
            pass


def _check_shard(loc, split, entry, schema, quick, seen, problems) -> int:
    """Check one shard; returns the number of samples read (manifest count when quick)."""
    name = entry["name"]
    found: list[Problem] = []
    samples = None
    try:
        with loc.open(name) as raw:
            reader = _HashingReader(raw)
            if quick:
                reader.drain()
            else:
                samples = _check_samples(reader, name, split, schema, seen, found)
                reader.drain()       # tar end padding, or the rest after a broken header
    except (StorageError, OSError) as e:
        if not _exists(loc, name):
            problems.append(Problem(name, "", "missing", "shard listed in manifest does not exist"))
        else:
            problems.append(Problem(name, "", "read", f"cannot read shard: {e}"))
        return 0
    head = []
    if reader.size != entry["bytes"]:
        head.append(Problem(name, "", "size", f"{reader.size} bytes, manifest says {entry['bytes']}"))
    if reader.sha.hexdigest() != entry["sha256"]:
        head.append(Problem(name, "", "sha256", "content does not match the manifest's sha256"))
    if samples is not None and samples != entry["num_samples"]:
        found.append(Problem(name, "", "count", f"{samples} samples, manifest says {entry['num_samples']}"))
    problems.extend(head + found)
    return entry["num_samples"] if quick else samples or 0


def _members(tar: tarfile.TarFile, shard, problems) -> Iterator[tuple[str, str, bytes]]:
    """(key, ext, data) of each regular member; unsafe or unreadable entries become problems."""
    try:
        for m in tar:
            key, ext = _split_name(m.name)
            if m.name.startswith("/") or ".." in m.name.split("/") or "\\" in m.name:
                problems.append(Problem(shard, key, "security", f"unsafe member name {m.name!r}"))
            elif not m.isfile():
                problems.append(Problem(shard, key, "security", f"{m.name!r} is not a regular file"))
            elif m.size > _MAX_MEMBER_BYTES:
                problems.append(Problem(shard, key, "member", f"{m.name} is {m.size} bytes; not read"))
            else:
                yield key, ext, tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        problems.append(Problem(shard, "", "tar", f"tar breaks off: {e}"))


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key ends at the first dot of the file name."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


def _check_samples(reader, shard, split, schema, seen, problems) -> int | None:
    """Samples read from the shard, or None when it is not a tar at all."""
    try:
        tar = tarfile.open(fileobj=reader, mode="r|")
    except (tarfile.TarError, EOFError, OSError) as e:
        problems.append(Problem(shard, "", "tar", f"not a readable tar: {e}"))
        return None
    done: set[str] = set()
    current, members, fragment = None, {}, False
    count = 0

    def finish():
        nonlocal count
        if current is None:
            return
        if fragment:      # already checked and counted as a sample; only look for payloads
            _check_exts(shard, current, members, problems)
            return
        count += 1
        label = _check_sample(shard, split, current, members, schema, problems)
        if label is not None:
            seen.labels.setdefault(split, Counter())[label] += 1

    for key, ext, data in _members(tar, shard, problems):
        if key != current:
            finish()
            fragment = key in done
            if fragment:
                problems.append(Problem(shard, key, "contiguity", "members of this sample are not contiguous"))
            elif key in seen.keys:
                other_split, other_shard = seen.keys[key]
                check = "duplicate" if other_split == split else "leakage"
                where = f"{other_shard}" if other_split == split else f"split {other_split} ({other_shard})"
                problems.append(Problem(shard, key, check, f"key also in {where}"))
            else:
                seen.keys[key] = (split, shard)
            done.add(key)
            current, members = key, {}
        if ext in members:
            problems.append(Problem(shard, key, "members", f"member .{ext} appears twice"))
        members[ext] = data
    finish()
    return count


# ---------------------------------------------------------------- one sample


def _check_sample(shard, split, key, members: dict[str, bytes], schema: _Schema, problems) -> int | None:
    """Check one sample's members; returns its label index when its .cls is valid."""
    def bad(check, message):
        problems.append(Problem(shard, key, check, message))

    frames = _check_exts(shard, key, members, problems)
    for ext in ("cls", "json", "spec.npy"):
        if ext not in members:
            bad("members", f"no .{ext} member")
    label_index = _check_cls(members.get("cls"), schema, bad)
    meta = _check_json(members.get("json"), key, split, label_index, schema, bad)
    if "spec.npy" in members:
        _check_spec(members["spec.npy"], schema, bad)
    _check_frames(frames, meta, schema, bad)
    return label_index


def _check_exts(shard, key, members: dict[str, bytes], problems) -> list[tuple[int, bytes]]:
    """Report pickle-like and unknown members; returns the frames as (index, bytes)."""
    frames = []
    for ext in sorted(members):
        m = _FRAME.match(ext)
        if m:
            frames.append((int(m.group(1)), members[ext]))
        elif ext.rpartition(".")[2] in _PICKLE_EXTS:
            problems.append(Problem(shard, key, "security", f"pickle member .{ext} (never loaded)"))
        elif ext not in ("cls", "json", "spec.npy"):
            problems.append(Problem(shard, key, "member", f"unknown member .{ext}"))
    return sorted(frames)


def _check_cls(data, schema, bad) -> int | None:
    if data is None:
        return None
    try:
        text = data.decode("ascii").strip()
        value = int(text)
        if text != str(value):
            raise ValueError
    except (UnicodeDecodeError, ValueError):
        bad("cls", f"not an ASCII integer: {data[:20]!r}")
        return None
    if not 0 <= value < len(schema.classes):
        bad("cls", f"label index {value} not in 0..{len(schema.classes) - 1}")
        return None
    return value


def _check_json(data, key, split, label_index, schema, bad) -> dict:
    if data is None:
        return {}
    try:
        meta = json.loads(data)
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except (ValueError, RecursionError) as e:
        bad("json", f"does not parse: {e}")
        return {}
    expected = {"key": key, "split": split}
    if label_index is not None:
        expected.update(label_index=label_index, label=schema.classes[label_index])
    for field_name, want in expected.items():
        if meta.get(field_name) != want:
            bad("json", f"{field_name} is {meta.get(field_name)!r}, expected {want!r}")
    return meta


def _npy_header(data: bytes):
    """(shape, dtype, header length) from the .npy header, parsed without evaluating or
    unpickling anything."""
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read:
        raise ValueError(f"unsupported .npy version {version}")
    shape, _fortran, dtype = read[version](f)
    return shape, dtype, f.tell()


def _check_spec(data: bytes, schema, bad):
    if not data.startswith(_NPY_MAGIC):
        # np.load would try to unpickle anything that is not .npy/.npz (with allow_pickle)
        kind = "a pickle" if data[:1] == b"\x80" else "not a .npy file"
        bad("security" if kind == "a pickle" else "spec", f"spec.npy is {kind} (never loaded)")
        return
    try:
        shape, dtype, offset = _npy_header(data)
    except Exception as e:  # noqa: BLE001 - a hostile header can raise anything numpy parses it with
        bad("spec", f"bad .npy header: {e}")
        return
    if dtype.hasobject:
        bad("security", f"spec.npy holds Python objects ({dtype}); loading it would unpickle")
        return
    # np.load allocates what the header claims before reading: check the bytes are there
    claimed = math.prod(shape) * dtype.itemsize
    if claimed > len(data) - offset:
        bad("spec", f"does not load: header claims {shape} {dtype} ({claimed} bytes), "
                    f"the member holds {len(data) - offset}")
        return
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        bad("spec", f"does not load: {e}")
        return
    if arr.ndim != 2 or tuple(arr.shape) != tuple(schema.spec_shape):
        bad("spec", f"shape {tuple(arr.shape)}, preset implies {tuple(schema.spec_shape)}")
    if arr.dtype != np.dtype(schema.spec_dtype):
        bad("spec", f"dtype {arr.dtype}, dataset.json says {schema.spec_dtype}")
    if arr.dtype.kind not in "fiu":
        bad("spec", f"dtype {arr.dtype} is not numeric")
    elif not np.isfinite(arr).all():
        bad("spec", f"{int((~np.isfinite(arr)).sum())} non-finite values")


def _check_frames(frames: list[tuple[int, bytes]], meta: dict, schema, bad):
    if not frames:
        bad("members", "no frames")
        return
    indices = [i for i, _ in frames]
    if indices != list(range(len(frames))):
        bad("frame", f"frame numbers {indices[:8]} are not 0..{len(frames) - 1}")
    if "n_frames" in meta and meta["n_frames"] != len(frames):
        bad("json", f"n_frames is {meta['n_frames']!r} but the sample has {len(frames)} frames")
    expected = meta.get("frame_size")
    expected = tuple(expected) if isinstance(expected, list) and len(expected) == 2 else None
    for i, data in frames:
        problem = _frame_problem(data, schema.frame_size, expected)
        if problem:
            bad("frame", f"f{i:03d}.jpg: {problem}")


def _frame_problem(data: bytes, frame_size: int, expected: tuple[int, int] | None) -> str:
    """Why ``data`` is not a decodable RGB JPEG of the recorded size ("" when it is).
    The size is checked from the header first, so an oversized frame is never decoded."""
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
            w, h = im.size
            if frame_size and min(w, h) != frame_size:
                return f"{w}x{h}, short side should be {frame_size}"
            if expected and (w, h) != expected:
                return f"{w}x{h}, json frame_size says {expected[0]}x{expected[1]}"
            if w * h > _MAX_PIXELS:
                return f"{w}x{h} is too large to decode"
            im.load()
            return "" if im.mode == "RGB" else f"mode {im.mode}, expected RGB"
    except Image.UnidentifiedImageError:
        return "not a JPEG image"
    except Exception as e:  # noqa: BLE001 - hostile bytes can trip any decoder error
        return f"not a decodable JPEG ({type(e).__name__}: {_ADDRESS.sub('', str(e))})"
