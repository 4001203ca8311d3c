"""Verify an extracted dataset (README: Output) without trusting it.

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
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import shardformat as sf
from . import storage
from .errors import ConfigError, StorageError
from .shardformat import TMP_MARK
from .storage import Location

_CHUNK = 1 << 20


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
    dataset.json, the manifests and the sample indexes are read by ``shardformat.open_dataset``,
    as the loader reads them: what it refuses is reported as a problem.
    Raises ConfigError when there is no dataset.json at all.
    """
    loc = _open_location(location, s3_endpoint)
    report = VerifyReport(location=str(location) if isinstance(location, (str, Path)) else _root_url(loc),
                          quick=quick)
    problems = report.problems
    refused: list[sf.ShardDataError] = []
    try:
        dataset = sf.open_dataset(loc, problems=refused)
    except (StorageError, OSError) as e:
        raise ConfigError(f"not an avprep dataset (an extraction writes {sf.DATASET} last): "
                          f"cannot read {e}") from None
    except sf.ShardDataError as e:
        problems.append(_refused(loc, e.shard, e))
        return report
    problems.extend(_refused(loc, e.shard, e) for e in refused)
    shards = [(split, entry) for split, m in dataset.splits.items() for entry in m.shards]
    report.num_shards = len(shards)
    _check_strays(loc, {e.name for _, e in shards}, problems)
    indexes = {} if quick else {split: _index(loc, dataset, split, problems) for split in dataset.splits}
    if not quick:
        refused = []
        dataset.check_indexes(problems=refused)
        problems.extend(_refused(loc, e.shard, e) for e in refused)
    seen = _Seen()
    for done, (split, entry) in enumerate(shards, 1):
        report.num_samples += _check_shard(loc, split, entry, dataset.meta, quick, seen, problems,
                                           indexes.get(split))
        if on_progress:
            on_progress(done, len(shards), entry.name)
    if not quick:
        _check_class_counts(dataset.splits, shards, seen, dataset.meta, problems)
    return report


@dataclass
class _Seen:
    """What the shards held so far: where each key was first seen, labels per split."""

    keys: dict[str, tuple[str, str]] = field(default_factory=dict)     # key -> (split, shard)
    labels: dict[str, Counter] = field(default_factory=dict)           # split -> label index counts


def _check_class_counts(manifests: dict[str, sf.Manifest], shards, seen: _Seen, schema: sf.DatasetMeta,
                        problems) -> None:
    """Manifest class counts against the labels read, for splits whose shards all read cleanly
    (a missing or broken shard would only repeat itself here)."""
    troubled = {p.shard for p in problems}
    for split, man in manifests.items():
        if any(e.name in troubled for s, e in shards if s == split):
            continue
        counts = seen.labels.get(split, Counter())
        actual = {schema.classes[i]: n for i, n in sorted(counts.items())}
        listed = man.class_counts
        if {k: v for k, v in listed.items() if v} != actual:
            problems.append(Problem(sf.manifest_name(split), "", "class_counts",
                                    f"class_counts {listed} but the shards hold {actual}"))


# ---------------------------------------------------------------- dataset.json, manifests, indexes


def _root_url(loc: Location) -> str:
    return loc.url(sf.DATASET).rpartition("/")[0] or "."


def _refused(loc: Location, name: str, e: sf.ShardDataError) -> Problem:
    """The side file ``name`` that shardformat refused, as a problem of that file."""
    return Problem(name, "", e.check, str(e).removeprefix(loc.url(name)).removeprefix(":").strip())


def _index(loc: Location, dataset: sf.Dataset, split: str, problems: list[Problem]) -> dict | None:
    """{shard: [IndexEntry]} of the split's sample index (what the loader reads), or None when
    shardformat refuses it; a mismatch with the manifest is a problem, the entries still checked."""
    name = sf.index_name(split)
    refused: list[sf.ShardDataError] = []
    try:
        entries = dataset.index(split, problems=refused)
    except sf.ShardDataError as err:
        refused.append(err)
        entries = None
    problems.extend(_refused(loc, name, e) for e in refused)
    if entries is None:
        return None
    by_shard: dict[str, list[sf.IndexEntry]] = {}
    for e in entries:
        by_shard.setdefault(e.shard, []).append(e)
    return by_shard


def _check_strays(loc, listed: set[str], problems):
    """Shard-like files no manifest lists: leftovers of an interrupted or older run."""
    if not isinstance(loc, storage.LocalLocation):
        return      # remote prefixes are not listed: only what the manifests name is read
    for name in sorted(p.name for p in loc.root.iterdir() if p.is_file()):
        if TMP_MARK in name:
            problems.append(Problem(name, "", "stray", "temporary file of an interrupted write"))
        elif name.endswith(sf.SHARD_SUFFIX) and name not in listed:
            problems.append(Problem(name, "", "stray", "shard not listed in any manifest"))


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


def _check_shard(loc, split, entry, schema, quick, seen, problems, index) -> int:
    """Check one shard; returns the number of samples read (manifest count when quick)."""
    name = entry.name
    found: list[Problem] = []
    samples = None
    try:
        with loc.open(name) as raw:
            reader = _HashingReader(raw)
            if quick:
                reader.drain()
            else:
                entries = None if index is None else index.get(name, [])
                samples = _check_samples(reader, loc.url(name), name, split, schema, seen, found, entries)
                reader.drain()       # the rest after a broken header
    except (StorageError, OSError) as e:
        if not _exists(loc, name):
            problems.append(Problem(name, "", "missing", "shard listed in manifest does not exist"))
        else:
            problems.append(Problem(name, "", "read", f"cannot read shard: {e}"))
        return 0
    head = []
    if reader.size != entry.bytes:
        head.append(Problem(name, "", "size", f"{reader.size} bytes, manifest says {entry.bytes}"))
    if reader.sha.hexdigest() != entry.sha256:
        head.append(Problem(name, "", "sha256", "content does not match the manifest's sha256"))
    if samples is not None and samples != entry.num_samples:
        found.append(Problem(name, "", "count", f"{samples} samples, manifest says {entry.num_samples}"))
    problems.extend(head + found)
    return entry.num_samples if quick else samples or 0


class _Tee:
    """Keeps the bytes read through it from ``start`` on (``window``), so samples of the index
    can be cut out of the one sequential pass."""

    def __init__(self, f):
        self.f, self.window, self.start, self.pos = f, bytearray(), 0, 0
        self.recording = True

    def read(self, n=-1):
        data = self.f.read(n)
        if self.recording:
            self.window += data
        self.pos += len(data)
        return data

    def readinto(self, b):
        n = self.f.readinto(b)
        if self.recording:
            self.window += memoryview(b)[:n]
        self.pos += n
        return n

    def seekable(self):
        return False


class _Indexed:
    """The sample index of one shard, checked as the loader reads it: each entry's bytes are cut
    out of the stream by offset and length, CRC-checked, parsed and checked, unless the sequential
    pass already checked exactly those bytes (same key, offset, length and CRC-32)."""

    def __init__(self, entries, tee: _Tee, url, shard, split, schema, problems):
        self.pending = sorted(entries, key=lambda e: (e.offset, e.key))
        self.tee, self.url, self.shard, self.split, self.schema = tee, url, shard, split, schema
        self.problems = problems
        self.matched: dict[str, tuple[int, int, int]] = {}
        self.done_to = 0       # the sequential pass has checked everything before this offset

    def bad(self, key, check, message):
        self.problems.append(Problem(self.shard, key, check, message))

    def flush(self, final: bool = False) -> None:
        tee = self.tee
        while self.pending:
            e = self.pending[0]
            end = e.offset + e.length
            if not final and end > self.done_to:
                break
            self.pending.pop(0)
            if e.length > sf.MAX_SAMPLE or e.offset < tee.start:
                self.bad(e.key, "index", f"entry at byte {e.offset} of {e.length} bytes is out of order or too large")
            elif end > tee.pos:
                self.bad(e.key, "index", f"bytes {e.offset}-{end - 1} run past the end of the shard ({tee.pos} bytes)")
            elif self.matched.get(e.key) != (e.offset, e.length, e.crc32):
                self._check(e, tee.window[e.offset - tee.start:end - tee.start])
        keep = self.pending[0].offset if self.pending else tee.pos
        cut = min(max(keep - tee.start, 0), len(tee.window))
        del tee.window[:cut]
        tee.start += cut
        if not self.pending:        # nothing left to cut out: stop keeping bytes
            tee.recording = False
            tee.window.clear()
            tee.start = tee.pos

    def _check(self, e, data: bytearray) -> None:
        if zlib.crc32(data) != e.crc32:
            self.bad(e.key, "checksum", "its bytes do not match the CRC-32 of the sample index")
            return
        try:
            s = sf.parse_sample_bytes(data, self.url, e.key)
        except sf.ShardDataError as err:
            self.bad(e.key, err.check, str(err).removeprefix(f"{self.url}: "))
            return
        _check_sample(self.shard, self.split, s, self.schema, self.problems)
        self.problems.extend(_line_problems(e, s, self.split, self.schema))


def _check_samples(reader, url, shard, split, schema, seen, problems, entries) -> int | None:
    """Samples read from the shard (through shardformat's reader, as the loader), or None when
    it is not a tar at all. With a sample index (``entries``), each indexed sample is also checked
    from exactly the bytes the loader reads (see ``_Indexed``)."""
    tee = _Tee(reader)
    tee.recording = bool(entries)
    tar = sf.TarReader(tee, url, crc=True)
    indexed = _Indexed(entries, tee, url, shard, split, schema, problems) if entries is not None else None
    listed = {e.key: (e.offset, e.length, e.crc32) for e in entries or ()}
    lines = {e.key: e for e in entries or ()}
    done: set[str] = set()      # keys checked (and counted) as samples
    spans, tar_broken = 0, False
    try:
        for s in sf.read_shard_samples(None, url, tar=tar):
            spans += 1
            found = _index_problems(s, shard, listed, indexed) if indexed is not None else []
            if indexed is not None and s.key in indexed.matched:      # the index's bytes: its fields too
                found += _line_problems(lines[s.key], s, split, schema)
            found += _sample_problems(s, shard, split, schema, seen, done)
            if s.key in listed and listed[s.key] != (s.offset, s.length, s.crc32):
                # not the bytes the index (and the loader) has for this key: the key is judged from
                # its indexed bytes; what this pass saw is the shard's problem
                found = [Problem(shard, "", p.check, f"sample {p.key}: {p.message}") for p in found]
            problems.extend(found)
            if indexed is not None:
                indexed.done_to = s.offset + s.length
                indexed.flush()
    except sf.ShardDataError as e:
        problems.append(Problem(shard, "", "tar", str(e).removeprefix(f"{url}: ")))
        tar_broken = True
    if indexed is not None:
        while tee.read(_CHUNK):     # the rest of the shard, for the samples the tar pass did not reach
            indexed.flush()
        indexed.flush(final=True)
    return None if tar_broken and spans == 0 else len(done)


def _index_problems(s: sf.RawSample, shard: str, listed: dict, indexed: _Indexed) -> list[Problem]:
    """Where the sample index says ``s`` is, against where the tar has it."""
    span = (s.offset, s.length, s.crc32)
    if s.key not in listed:
        return [Problem(shard, s.key, "index", "in the shard but not in the sample index")]
    if listed[s.key] != span:
        return [Problem(shard, s.key, "index", "offset/length/crc32 {}/{}/{} in the shard, the "
                        "index says {}/{}/{}".format(*span, *listed[s.key]))]
    indexed.matched[s.key] = span
    return []


def _line_problems(e: sf.IndexEntry, s: sf.RawSample, split: str, schema: sf.DatasetMeta) -> list[Problem]:
    """The fields of sample ``s``'s index line against the sample itself: label_index (the
    loader's label check), label, source, duration, frame count. A problem of the index file
    (its line is wrong, the sample is not)."""
    found: dict[str, object] = {"n_frames": len(s.frames)}
    try:
        found["label_index"] = label = sf.parse_cls(s.members[sf.CLS], len(schema.classes))
        found["label"] = schema.classes[label]
    except (KeyError, sf.ShardDataError):
        pass
    try:
        meta = json.loads(bytes(s.members[sf.JSON]))
        found.update({k: meta[k] for k in ("source", "duration") if k in meta} if isinstance(meta, dict) else {})
    except (KeyError, ValueError, RecursionError):
        pass
    unset = {"label": "", "n_frames": 0, "source": "", "duration": 0.0}     # an index without the field
    return [Problem(sf.index_name(split), "", "index", f"line of {e.key}: {f} is {getattr(e, f)!r}, "
                    f"the sample in {e.shard} has {want!r}")
            for f, want in found.items() if getattr(e, f) != want and getattr(e, f) != unset.get(f, object())]


def _sample_problems(s: sf.RawSample, shard: str, split: str, schema: sf.DatasetMeta, seen: _Seen,
                     done: set[str]) -> list[Problem]:
    """The problems of one sample of the tar pass: its content, its key seen before (in this
    shard: members not contiguous; elsewhere: a duplicate, or leakage across splits)."""
    problems: list[Problem] = []
    if s.key in done:       # already checked and counted as a sample; only look for payloads
        problems.append(Problem(shard, s.key, "contiguity", "members of this sample are not contiguous"))
        problems += [Problem(shard, s.key, check, message) for check, message in s.problems]
        return problems
    if s.key in seen.keys:
        other_split, other_shard = seen.keys[s.key]
        check = "duplicate" if other_split == split else "leakage"
        where = f"{other_shard}" if other_split == split else f"split {other_split} ({other_shard})"
        problems.append(Problem(shard, s.key, check, f"key also in {where}"))
    else:
        seen.keys[s.key] = (split, shard)
    done.add(s.key)
    label = _check_sample(shard, split, s, schema, problems)
    if label is not None:
        seen.labels.setdefault(split, Counter())[label] += 1
    return problems


# ---------------------------------------------------------------- one sample


def _check_sample(shard, split, s: sf.RawSample, schema: sf.DatasetMeta, problems) -> int | None:
    """Check one sample's members with shardformat's decoders; returns its label index when its
    .cls is valid."""
    def bad(check, message):
        problems.append(Problem(shard, s.key, check, message))

    for check, message in s.problems:
        bad(check, message)
    members = s.members
    for ext in sf.CORE_MEMBERS:
        if ext not in s.present:
            bad("members", f"no .{ext} member")
    label_index = None
    if sf.CLS in members:
        try:
            label_index = sf.parse_cls(members[sf.CLS], len(schema.classes))
        except sf.ShardDataError as e:
            bad(e.check, str(e))
    meta = _check_json(members.get(sf.JSON), s.key, split, label_index, schema, bad)
    if sf.SPEC in members:
        try:
            sf.parse_spec(members[sf.SPEC], shape=schema.spec_shape, dtype=schema.spec_dtype)
        except sf.ShardDataError as e:
            bad(e.check, str(e))
    frames = sorted((int(m[1]), members[ext]) for ext in members if (m := sf.FRAME.fullmatch(ext)))
    _check_frames(frames, meta, schema, bad)
    return label_index


def _check_json(data, key, split, label_index, schema, bad) -> dict:
    if data is None:
        return {}
    try:
        meta = json.loads(bytes(data))
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
    try:
        sf.parse_segments(meta, len(schema.classes))
    except sf.ShardDataError as e:
        bad("json", str(e))
    return meta


def _check_frames(frames: Sequence[tuple[int, bytes | bytearray]], meta: dict, schema, bad):
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
            bad("frame", f"{sf.frame_name(i)}: {problem}")


def _frame_problem(data: bytes | bytearray, frame_size: int, expected: tuple[int, int] | None) -> str:
    """Why ``data`` is not a decodable RGB JPEG of the recorded size ("" when it is).
    The size is checked from the header first, so an oversized frame is never decoded."""
    try:
        im = sf.open_jpeg(data, load=False)
    except sf.ShardDataError as e:
        return str(e)
    with im:
        w, h = im.size
        if frame_size and min(w, h) != frame_size:
            return f"{w}x{h}, short side should be {frame_size}"
        if expected and (w, h) != expected:
            return f"{w}x{h}, json frame_size says {expected[0]}x{expected[1]}"
        try:
            sf.open_jpeg(data)
        except sf.ShardDataError as e:
            return str(e)
        return "" if im.mode == "RGB" else f"mode {im.mode}, expected RGB"
