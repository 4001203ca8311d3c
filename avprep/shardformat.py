"""The shard format (README: Output), owned here and nowhere else.

Everything that names, orders, parses or describes what ``avprep extract`` writes lives in this
module: member names and their order, the key/extension rule, the frame pattern, the refused
(pickle) extensions, the safe ``.npy`` / ``.cls`` / JPEG parsers, the one streaming tar reader,
and the typed files next to the shards (``dataset.json``, ``<split>.manifest.json``, the sample
index ``<split>.samples.jsonl``, ``<split>.wids.json`` and the Hugging Face card ``README.md``).
The writer (``shards.py``/``extract.py``), ``verify``, the training loader and ``avprep info``
all go through it, so they accept and refuse exactly the same shards.

Shards are untrusted. The tar reader never trusts a declared size beyond the bytes that are
really there (and a per-member limit), is iterative (no recursion on chained extension headers),
requires the end-of-archive block and nothing but zeros after it. Nothing is ever unpickled.

The sample index gives, per sample, the byte offset of its first tar header inside its shard, its
total length (headers, payloads, padding: up to the next sample's first header) and the CRC-32 of
those bytes, so a reader can fetch any run of samples with one byte-range request and check each
sample before decoding it.
"""
from __future__ import annotations

import ast
import io
import json
import math
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from typing import TYPE_CHECKING, TypeGuard

import numpy as np

from .datasets._base import SPLITS
from .errors import AvprepError, StorageError

if TYPE_CHECKING:
    from .storage import Location, Retry

# ---------------------------------------------------------------- names

# The files of an output folder. dataset.json is written last: it marks a complete output.
DATASET = "dataset.json"
CARD = "README.md"                      # the Hugging Face dataset card
FAILURES = "failures.jsonl"             # one line per clip that failed (written by outdir)
SHARD_SUFFIX = ".tar"                   # <split>-NNNNNN.tar
INDEX_SUFFIX = ".samples.jsonl"         # <split>.samples.jsonl, the sample index
WIDS_SUFFIX = ".wids.json"              # <split>.wids.json
MANIFEST_SUFFIX = ".manifest.json"      # <split>.manifest.json
SPLIT_FILE_SUFFIXES = (INDEX_SUFFIX, WIDS_SUFFIX, MANIFEST_SUFFIX)     # a split's side files, in writing order
# The members of a sample: <key>.cls, <key>.json, <key>.spec.npy, then <key>.f000.jpg, ...
CLS, JSON, SPEC = "cls", "json", "spec.npy"
CORE_MEMBERS = (CLS, JSON, SPEC)        # in tar order, then the frames
FRAME = re.compile(r"f(\d{3,})\.jpg")
# Members whose only use is to be unpickled (compared case-insensitively on the last extension).
REFUSED_EXTS = frozenset({"pyd", "pickle", "pkl", "pt", "pth", "ckpt"})
SHARD_NAME = re.compile(r"[A-Za-z0-9_]+(?:-[A-Za-z0-9_]+)*-\d{6}\.tar")
TMP_MARK = ".tmp-"
MAX_MEMBER = 256 * 2**20        # bigger than any real member: bounds memory per read
MAX_SAMPLE = 2 * MAX_MEMBER     # an index entry claiming more is refused before anything is read
MAX_PIXELS = 64 * 2**20         # a frame larger than this is an attack (or not ours): never decoded
MAX_EXT_HEADERS = 8             # pax/GNU long-name headers allowed before one member
MAX_EXT_BYTES = 1 << 20


def frame_name(i: int) -> str:
    return f"f{i:03d}.jpg"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}{SHARD_SUFFIX}"


def index_name(split: str) -> str:
    return split + INDEX_SUFFIX


def manifest_name(split: str) -> str:
    return split + MANIFEST_SUFFIX


def wids_name(split: str) -> str:
    return split + WIDS_SUFFIX


def is_output_file(name: str) -> bool:
    """A file ``avprep extract`` writes into an output folder (or a temporary one of a writer)."""
    return (name in (DATASET, FAILURES, CARD) or name.endswith((SHARD_SUFFIX, *SPLIT_FILE_SUFFIXES))
            or TMP_MARK in name)


def split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key ends at the first dot of the file name; ("", "") when the
    name has no extension (not a sample member)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return "", ""
    return (f"{head}/{stem}" if head else stem), ext


def is_refused(ext: str) -> bool:
    """A pickle-like member (``.pkl``, ``.PKL``, ``.ckpt``, ``x.pth`` ...): never read."""
    return ext.rpartition(".")[2].lower() in REFUSED_EXTS


def unsafe_name(name: str) -> bool:
    return (not name or name.startswith("/") or ".." in name.split("/") or "\\" in name
            or "\0" in name)


def ordered_members(cls: bytes, meta: bytes, spec: bytes, frames: list[bytes]) -> dict[str, bytes]:
    """The members of one sample, without the key prefix, in tar order."""
    out = {CLS: cls, JSON: meta, SPEC: spec}
    for i, jpeg in enumerate(frames):
        out[frame_name(i)] = jpeg
    return out


# ---------------------------------------------------------------- errors


class ShardDataError(AvprepError):
    """A shard, sample, index or manifest is malformed or unsafe (the message names where).

    ``check`` says what kind of problem it is (``security`` for refused content, ``tar``,
    ``checksum``, ``spec``, ``cls``, ``frame``, ``members``, ``manifest``, ``index`` ...);
    ``shard``/``key`` locate it when known."""

    def __init__(self, message: str, *, check: str = "data", shard: str = "", key: str = ""):
        super().__init__(message)
        self.check, self.shard, self.key = check, shard, key


# ---------------------------------------------------------------- the tar reader

_BLOCK = 512
_ZERO = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_SKIP = 1 << 16


@dataclass(slots=True)
class Member:
    name: str
    size: int
    offset: int         # of the member's first header (extension headers included)


class TarReader:
    """The regular members of one tar stream, in order, without trusting it.

    ``members()`` yields :class:`Member`; the caller may ``read(member.size)`` the payload, else it
    is skipped. ``size`` (the file or object size, when known) bounds every declared size; without
    it, skipped payloads are read and discarded, so a lie ends at the real end of the stream.
    ``slice=True`` reads a run of samples cut out by the sample index: it ends exactly at ``size``
    with no end-of-archive block. Otherwise the stream must end with the end-of-archive block and
    only zeros after it. ``crc=True`` records the bytes consumed (``record``), so samples get their CRC-32.
    """

    def __init__(self, stream, url: str, *, size: int | None = None, slice: bool = False,
                 max_member: int = MAX_MEMBER, crc: bool = False):
        self.f, self.url, self.size, self.slice = stream, url, size, slice
        self.max_member = max_member
        self.pos = 0
        self.left = 0
        self.seekable = not crc and stream.seekable() and size is not None
        self.record = bytearray() if crc else None     # bytes consumed since record_start
        self.record_start = 0
        self.eoa = -1       # offset of the end-of-archive block, once reached

    def fail(self, problem: str, check: str = "tar"):
        raise ShardDataError(f"{self.url}: not a readable tar shard ({problem})", check=check,
                             shard=self.url.rpartition("/")[2])

    def _raw(self, n: int) -> bytes:
        data = self.f.read(n)
        if self.record is not None:
            self.record += data
        return data

    def read(self, n: int) -> bytearray:
        if n > self.max_member:
            self.fail(f"a member of {n} bytes at byte {self.pos}; the limit is {self.max_member >> 20} MiB")
        if self.size is not None and self.pos + n > self.size:
            self.fail(f"a member of {n} bytes at byte {self.pos} runs past the end ({self.size} bytes)")
        data = bytearray(n)     # writable: numpy and torch can view it without a copy
        got = self.f.readinto(data)
        if got != n:
            self.fail(f"truncated at byte {self.pos + got}")
        if self.record is not None:
            self.record += data
        self.pos += n
        self.left -= n
        return data

    def _skip(self) -> None:
        if self.size is not None and self.pos + self.left > self.size:
            self.fail(f"a member runs past the end at byte {self.pos + self.left} ({self.size} bytes)")
        if self.seekable:
            self.f.seek(self.left, 1)
            self.pos += self.left
            self.left = 0
        while self.left:
            data = self._raw(min(self.left, _SKIP))
            if not data:
                self.fail(f"truncated at byte {self.pos}")
            self.pos += len(data)
            self.left -= len(data)

    def _header(self) -> bytes | None:
        """The next 512-byte header, or None at the end of a slice."""
        if self.slice and self.pos == self.size:
            return None
        header = self._raw(_BLOCK)
        if len(header) != _BLOCK:
            self.fail("empty file" if self.pos == 0 and not header else
                      f"truncated at byte {self.pos + len(header)}: no end-of-archive block")
        return header

    def members(self) -> Iterator[Member]:
        name = size = None     # from a GNU long-name or pax header, for the next member only
        start, extensions = None, 0
        while True:
            self._skip()
            at = self.pos
            header = self._header()
            if header is None:
                if start is not None:
                    self.fail(f"extension header at byte {start} without a member")
                return
            if header == _ZERO:
                if self.slice:
                    self.fail(f"end-of-archive block inside a sample at byte {at}")
                if start is not None:
                    self.fail(f"extension header at byte {start} without a member")
                self.eoa = at
                self.pos += _BLOCK
                self._trailer()
                return
            n = self._header_size(header)
            self.pos += _BLOCK
            kind = header[156:157]
            if kind in (b"1", b"2", b"3", b"4", b"5", b"6"):
                n = 0       # links, devices, folders carry no payload whatever the size field says
            elif n > self.max_member:
                self.fail(f"a member of {n} bytes at byte {at}; the limit is {self.max_member >> 20} MiB")
            self.left = n + -n % _BLOCK
            start = at if start is None else start
            if kind in (b"L", b"x", b"g"):
                extensions += 1
                if extensions > MAX_EXT_HEADERS or n > MAX_EXT_BYTES:
                    self.fail(f"{extensions} extension header(s) of up to {n} bytes before byte {self.pos}")
                if kind == b"L":
                    name = _cstr(self.read(n))
                elif kind == b"x":
                    pax = self._pax(self.read(n))
                    name = pax.get("path", name)
                    size = pax["size"] if "size" in pax else size
                continue
            if kind in _REGULAR:
                if size is not None:
                    n = size
                    self.left = size + -size % _BLOCK
                if n > self.max_member:
                    self.fail(f"a member of {n} bytes at byte {at}; the limit is {self.max_member >> 20} MiB")
                if self.size is not None and self.pos + n > self.size:
                    self.fail(f"a member of {n} bytes at byte {at} runs past the end ({self.size} bytes)")
                yield Member(name if name is not None else _header_name(header), n, start)
            else:       # links, directories, devices: not sample members; reported by name
                yield Member(name if name is not None else _header_name(header), -1, start)
            name = size = start = None
            extensions = 0

    def _trailer(self) -> None:
        """After the first zero block: only zeros to the end (tar pads to a record)."""
        while True:
            data = self.f.read(_SKIP)
            if not data:
                break
            if data.count(0) != len(data):
                self.fail(f"non-zero bytes after the end-of-archive block near byte {self.pos}")
            self.pos += len(data)
            if self.size is not None and self.pos > self.size:
                self.fail(f"more bytes than the {self.size} announced")

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
            self.fail("gzip-compressed; shards must be plain .tar" if self.pos == 0 and header[:2] == b"\x1f\x8b"
                      else f"bad header at byte {self.pos}")
        return n

    def _pax(self, data: bytes | bytearray) -> dict:
        records: dict[str, str | int] = {}
        i = 0
        try:
            while i < len(data) and data[i:i + 1] != b"\0":
                space = data.index(b" ", i, i + 20)
                length = int(data[i:space])
                if length <= space - i + 1 or i + length > len(data) or data[i + length - 1:i + length] != b"\n":
                    raise ValueError("bad record length")
                key, eq, value = data[space + 1:i + length - 1].partition(b"=")
                if not eq:
                    raise ValueError("record without '='")
                records[key.decode()] = value.decode("utf-8", "surrogateescape")
                i += length
            if "size" in records:
                size = int(records["size"])
                records["size"] = size
                if size < 0:
                    raise ValueError("negative size")
        except (ValueError, UnicodeDecodeError):
            self.fail(f"bad pax header before byte {self.pos}")
        return records


def _cstr(data: bytes | bytearray) -> str:
    return bytes(data).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(data: bytes) -> int:
    if data[0] & 0x80:     # GNU base-256 for sizes >= 8 GiB
        if data[0] == 0xFF:
            raise ValueError("negative size")
        return int.from_bytes(data[1:], "big")
    text = _cstr(data).strip() or "0"
    if not re.fullmatch(r"[0-7]+", text):   # int(.., 8) would accept a sign or underscores
        raise ValueError("bad number")
    return int(text, 8)


def _header_name(header: bytes) -> str:
    name = _cstr(header[:100])
    if header[257:263] == b"ustar\0" and header[345]:     # POSIX prefix (GNU uses the field otherwise)
        name = f"{_cstr(header[345:500])}/{name}"
    return name


# ---------------------------------------------------------------- samples


@dataclass(slots=True)
class RawSample:
    """One sample as it sits in a shard: its members' payloads (refused ones never read) and,
    from a full-shard read, its byte span and CRC-32."""

    key: str
    shard: str
    members: dict[str, bytearray]
    offset: int = 0
    length: int = 0
    crc32: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)    # (check, message), not fatal to parsing
    present: set[str] = field(default_factory=set)     # every member extension, read or skipped

    @property
    def frames(self) -> list[bytearray]:
        """Frame payloads in frame order (names checked by :func:`check_members`)."""
        found = sorted((int(m[1]), ext) for ext in self.members if (m := FRAME.fullmatch(ext)))
        return [self.members[ext] for _, ext in found]


def member_problem(name: str, ext: str) -> tuple[str, str] | None:
    """(check, message) for a member no sample may hold, or None."""
    if unsafe_name(name):
        return "security", f"unsafe member name {name!r}"
    if is_refused(ext):
        return "security", f"pickle member .{ext} (never loaded)"
    if ext in CORE_MEMBERS or FRAME.fullmatch(ext):
        return None
    return "member", f"unknown member .{ext}"


def read_shard_samples(stream, url: str, *, size: int | None = None, crc: bool = True,
                       slice: bool = False, keep=None, tar: TarReader | None = None) -> Iterator[RawSample]:
    """The samples of a tar stream, grouped by key, each with its exact byte span and CRC-32.

    Raises :class:`ShardDataError` when the tar structure breaks (nothing after that point can be
    trusted). Per-member problems (unknown or refused members, duplicates) are recorded on the
    sample; refused members are never read. ``keep(ext)`` selects which payloads to read (all by
    default); the others are skipped unread.
    """
    shard = url.rpartition("/")[2]
    tar = tar or TarReader(stream, url, size=size, slice=slice, crc=crc)
    current: RawSample | None = None
    for m in tar.members():
        key, ext = split_name(m.name)
        if not key and m.size >= 0:
            continue        # no extension: not part of a sample (webdataset skips these too)
        if current is not None and key != current.key:
            _close(tar, current, m.offset)
            yield current
            current = None
        if current is None:
            current = RawSample(key, shard, {}, offset=m.offset)
        if m.size < 0:
            current.problems.append(("security", f"{m.name!r} is not a regular file"))
            continue
        bad = member_problem(m.name, ext)
        if bad:
            current.problems.append(bad)
            if bad[0] == "security":
                continue
        if ext in current.present:
            current.problems.append(("members", f"member .{ext} appears twice"))
            continue
        current.present.add(ext)
        if keep is None or keep(ext):
            current.members[ext] = tar.read(m.size)
    if current is not None:
        _close(tar, current, tar.pos if slice else tar.eoa)
        yield current


def _close(tar: TarReader, sample: RawSample, end: int) -> None:
    """Set the sample's span to [offset, end) and its CRC from the bytes the reader recorded."""
    sample.length = end - sample.offset
    if tar.record is not None:
        cut = end - tar.record_start
        sample.crc32 = zlib.crc32(memoryview(tar.record)[:cut])
        del tar.record[:cut]
        tar.record_start = end


def parse_sample_bytes(data, url: str, key: str, *, keep=None) -> RawSample:
    """The sample held by ``data`` (exactly one sample's bytes, cut out by the index)."""
    samples = list(read_shard_samples(io.BytesIO(data), url, size=len(data), crc=False, slice=True, keep=keep))
    if len(samples) != 1 or samples[0].key != key:
        found = ", ".join(s.key for s in samples) or "nothing"
        raise ShardDataError(f"{url}: sample {key}: the indexed bytes hold {found}", check="index",
                             shard=url.rpartition("/")[2], key=key)
    return samples[0]


# ---------------------------------------------------------------- member decoders


def parse_cls(data, num_classes: int | None = None) -> int:
    """A label index: ASCII digits only (no sign, no spaces inside), in [0, num_classes)."""
    try:
        text = bytes(data).decode("ascii").strip()
    except UnicodeDecodeError:
        text = None
    if text is None or not re.fullmatch(r"\d{1,9}", text) or text != str(int(text)):
        raise ShardDataError(f"not an ASCII integer label: {bytes(data[:20])!r}", check="cls")
    value = int(text)
    if num_classes is not None and not 0 <= value < num_classes:
        raise ShardDataError(f"label index {value} not in 0..{num_classes - 1}", check="cls")
    return value


_NPY_MAGIC = b"\x93NUMPY"


def npy_header(data) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of a ``.npy`` member, parsed without evaluating
    or unpickling anything; raises ``ShardDataError`` (check ``spec`` or ``security``)."""
    head = bytes(data[:12])
    if not head.startswith(_NPY_MAGIC):
        if head[:1] == b"\x80":
            raise ShardDataError("spec.npy is a pickle (never loaded)", check="security")
        raise ShardDataError("spec.npy is not a .npy file", check="spec")
    major = head[6]
    if major == 1:
        start = 10 + int.from_bytes(head[8:10], "little")
    elif major in (2, 3):
        start = 12 + int.from_bytes(head[8:12], "little")
    else:
        raise ShardDataError(f"spec.npy has unsupported .npy version {major}", check="spec")
    if start > min(len(data), 1 << 16):
        raise ShardDataError(f"spec.npy header of {start} bytes", check="spec")
    shape, fortran, dtype = _parse_npy_header(bytes(data[:start]), major)
    return shape, fortran, dtype, start


@lru_cache(maxsize=16)
def _parse_npy_header(head: bytes, major: int) -> tuple:
    """Cached: all the spectrograms of a dataset share one header."""
    start = 10 if major == 1 else 12
    try:
        text = head[start:].decode("latin1" if major < 3 else "utf-8")
        d = ast.literal_eval(text.strip())
        if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
            raise ValueError("header keys are not descr, fortran_order, shape")
        shape, fortran, descr = d["shape"], d["fortran_order"], d["descr"]
        if not isinstance(shape, tuple) or not all(isinstance(x, int) and 0 <= x < 2**31 for x in shape):
            raise ValueError(f"bad shape {shape!r}")
        if not isinstance(fortran, bool) or not isinstance(descr, str):
            raise ValueError("bad fortran_order or descr")
        dtype = np.dtype(descr)
    except Exception as e:  # noqa: BLE001 - literal_eval/np.dtype on hostile text raise many types
        raise ShardDataError(f"bad .npy header ({type(e).__name__}: {str(e)[:80]})", check="spec") from None
    if dtype.hasobject:
        raise ShardDataError(f"spec.npy holds Python objects ({dtype}); loading it would unpickle",
                             check="security")
    return shape, fortran, dtype


def parse_spec(data, *, shape: tuple[int, int] | None = None, dtype: str | None = None) -> np.ndarray:
    """The spectrogram of a ``spec.npy`` member: a 2-D finite float array whose header matches
    its bytes exactly (zero-copy view when native)."""
    arr_shape, fortran, dt, start = npy_header(data)
    if len(arr_shape) != 2 or dt.kind != "f":
        raise ShardDataError(f"spec.npy has shape {arr_shape} dtype {dt}; expected a 2-D float array", check="spec")
    count = math.prod(arr_shape)
    if len(data) - start != count * dt.itemsize:
        raise ShardDataError(f"spec.npy holds {len(data) - start} data bytes, not the "
                             f"{count * dt.itemsize} of its header", check="spec")
    if shape is not None and tuple(arr_shape) != tuple(shape):
        raise ShardDataError(f"spec.npy shape {tuple(arr_shape)}, the dataset's is {tuple(shape)}", check="spec")
    if dtype is not None and dt != np.dtype(dtype):
        raise ShardDataError(f"spec.npy dtype {dt}, dataset.json says {dtype}", check="spec")
    spec = np.frombuffer(data, dt, count, start).reshape(arr_shape, order="F" if fortran else "C")
    if not dt.isnative:
        spec = spec.astype(dt.newbyteorder("="))
    if not np.isfinite(spec).all():
        raise ShardDataError(f"spec.npy has {int((~np.isfinite(spec)).sum())} non-finite values", check="spec")
    return spec


def open_jpeg(data, *, max_pixels: int = MAX_PIXELS, load: bool = True):
    """A PIL image of a JPEG member; its size is checked from the header before decoding."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data), formats=["JPEG"])
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise ShardDataError(f"not a JPEG image ({type(e).__name__})", check="frame") from None
    w, h = im.size
    if w * h > max_pixels:
        raise ShardDataError(f"{w}x{h} frame is too large to decode", check="frame")
    if load:
        try:
            im.load()
        except Exception as e:  # noqa: BLE001
            raise ShardDataError(f"not a decodable JPEG ({type(e).__name__}: "
                                 f"{re.sub(r' at 0x[0-9a-fA-F]+', '', str(e))[:80]})", check="frame") from None
    return im


def check_structure(sample: RawSample) -> None:
    """The members every sample needs, frames numbered 0..n-1; raises ``ShardDataError``."""
    for check, message in sample.problems:
        raise ShardDataError(message, check=check)
    for need in CORE_MEMBERS:
        if need not in sample.present:
            raise ShardDataError(f"no .{need} member", check="members")
    frames = sorted(int(m[1]) for ext in sample.present if (m := FRAME.fullmatch(ext)))
    if not frames:
        raise ShardDataError("no frames", check="members")
    if frames != list(range(len(frames))):
        raise ShardDataError(f"frame numbers {frames[:8]} are not 0..{len(frames) - 1}", check="frame")


# ---------------------------------------------------------------- typed side files


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
              num_failures: int, spec_shape: tuple[int, int]) -> DatasetMeta:
        """dataset.json of a finished extraction: ``options`` (name, config, tool_version), the
        classes, split sizes, spectrogram shape and dtype, frame counts."""
        config = options.get("config", {})
        raw = {**options, "classes": list(classes),
               "splits": {s: m.num_samples for s, m in manifests.items()}, "num_failures": num_failures,
               "spec_shape": list(spec_shape),
               "spec_dtype": config.get("spec_dtype", "float16"),
               **frame_stats(r.get("n_frames", 0) for r in records)}
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
        _need(_is_int(config.get("frame_size", 0)), where, f"frame_size {str(config.get('frame_size'))[:40]!r} "
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
    from .config import SpecConfig

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


def split_order(splits: Iterable[str]) -> list[str]:
    """train, val, test first, then any other split names alphabetically."""
    splits = set(splits)
    return [s for s in SPLITS if s in splits] + sorted(splits - set(SPLITS))


# ---------------------------------------------------------------- a dataset, opened


@dataclass
class Dataset:
    """An extracted dataset as its side files describe it (:func:`open_dataset`): ``meta``
    (dataset.json), ``splits`` (each split's manifest, in split order) and, read on first use,
    each split's sample index (``index``). The loader, ``avprep verify``, ``avprep info`` and
    ``avprep index`` all open datasets here, so they accept and refuse the same files."""

    location: Location
    meta: DatasetMeta
    splits: dict[str, Manifest]
    _indexes: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def classes(self) -> list[str]:
        return self.meta.classes

    @property
    def num_classes(self) -> int:
        return len(self.meta.classes)

    def index(self, split: str, problems: list[ShardDataError] | None = None) -> list[IndexEntry]:
        """The sample index of ``split`` (one of ``splits``) in shard order, then byte order,
        checked against its manifest: the same shards with the same number of samples each.
        Raises ShardDataError when it is missing or malformed. A mismatch with the manifest
        raises too, or, with ``problems``, is appended there and the entries are returned anyway
        (so verify can check each one)."""
        if split not in self._indexes:
            self._indexes[split] = self._read_index(split)
        entries, mismatch = self._indexes[split]
        if mismatch is not None:
            if problems is None:
                raise mismatch
            problems.append(mismatch)
        return entries

    def _read_index(self, split: str) -> tuple[list[IndexEntry], ShardDataError | None]:
        name = index_name(split)
        where = self.location.url(name)
        try:
            data = self.location.read_bytes(name)
        except StorageError as e:
            raise ShardDataError(f"{where}: no sample index ({e}); add it with `avprep index OUT`", check="index",
                                 shard=name) from None
        entries = SampleIndex.from_json(data, split, where).entries
        manifest = self.splits[split]
        mismatch = None
        if Counter(e.shard for e in entries) != {s.name: s.num_samples for s in manifest.shards if s.num_samples}:
            mismatch = ShardDataError(f"{where}: does not match {manifest_name(split)} (samples per shard differ); "
                                      "rebuild it with `avprep index`", check="index", shard=name)
        order = {s.name: i for i, s in enumerate(manifest.shards)}
        entries.sort(key=lambda e: (order.get(e.shard, len(order)), e.offset))
        return entries, mismatch


def open_dataset(source, *, s3_endpoint: str | None = None, retry: Retry | None = None,
                 problems: list[ShardDataError] | None = None) -> Dataset:
    """The dataset at ``source`` (a folder, ``http(s)://`` or ``s3://`` prefix, or a
    ``storage.Location``): dataset.json and every split's manifest, parsed by the typed readers
    of this module.

    Raises StorageError when dataset.json cannot be read (no dataset there) and ShardDataError
    when it is malformed. A manifest that is malformed raises ShardDataError (one that cannot
    be read, StorageError); with ``problems``, either is appended there as a ShardDataError
    instead and its split left out, which is what ``avprep verify`` reports."""
    from .storage import Location, open_location  # storage imports this module

    loc = source if isinstance(source, Location) else open_location(source, s3_endpoint=s3_endpoint, retry=retry)
    meta = DatasetMeta.from_json(loc.read_bytes(DATASET), loc.url(DATASET))
    splits = {}
    for split in split_order(meta.splits):
        name = manifest_name(split)
        try:
            splits[split] = Manifest.from_json(loc.read_bytes(name), split, loc.url(name))
        except (StorageError, ShardDataError) as e:
            if problems is None:
                raise
            problems.append(e if isinstance(e, ShardDataError) else
                            ShardDataError(f"{loc.url(name)}: cannot read: {e}", check="manifest", shard=name))
    return Dataset(loc, meta, splits)


def wids_index(split: str, shards: list[ShardEntry], base: str = "") -> bytes:
    """``<split>.wids.json``: the shard list wids reads (relative urls resolve next to the file)."""
    return dump_json({"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": split,
                      "shardlist": [{"url": base + s.name, "nsamples": s.num_samples, "filesize": s.bytes}
                                    for s in shards]}, indent=1)


def write_split_files(out, split: str, index: SampleIndex, shards: list[ShardEntry], classes: list[str],
                      write) -> Manifest:
    """The sample index, wids index and manifest of one split, in that order (the manifest names the
    shards, so it comes last). ``write(path, bytes)`` writes one file atomically."""
    from pathlib import Path

    out = Path(out)
    counts = Counter(e.label for e in index.entries)
    manifest = Manifest(split, len(index.entries), {c: counts[c] for c in classes if c in counts}, shards)
    write(out / index_name(split), index.to_json())
    write(out / wids_name(split), wids_index(split, shards))
    write(out / manifest_name(split), manifest.to_json())
    return manifest


def _hf_type(value) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64"
    if isinstance(value, float):
        return "float64"
    if isinstance(value, str):
        return "string"
    return None


def _hf_json_struct(example: dict) -> list[str]:
    """YAML lines of a ``struct`` feature for a sample's ``json`` (scalars and flat lists)."""
    lines = []
    for k in sorted(example):
        v = example[k]
        if isinstance(v, list):
            kinds = {_hf_type(x) for x in v} or {"float64"}
            kinds = {"float64"} if kinds == {"int64", "float64"} else kinds
            if len(kinds) == 1 and None not in kinds:
                lines += [f"    - name: {json.dumps(k)}", f"      sequence: {kinds.pop()}"]
        elif _hf_type(v):
            lines += [f"    - name: {json.dumps(k)}", f"      dtype: {_hf_type(v)}"]
    return lines


def dataset_card(meta: DatasetMeta, manifests: dict[str, Manifest], example: dict | None = None) -> bytes:
    """``README.md``, a Hugging Face dataset card. One config whose ``data_files`` list each split's
    shards (so the side files are never taken for data), and the features, so ``datasets`` needs
    no inference: ``cls`` a ``ClassLabel`` with the class names, ``json`` a struct (its fields from
    ``example``, one sample's metadata), ``spec.npy`` an ``Array2D`` of the spectrogram's shape and
    dtype (``datasets`` decodes ``.npy`` without pickle), and frames ``f000.jpg`` .. up to
    ``max_frames`` as ``Image``: a sample with fewer frames has None in the others, which is how
    ``datasets`` fills members a sample lacks once the features are given (inferring them fails
    on varying frame counts)."""
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split, m in manifests.items():
        lines += [f"  - split: {split}", "    path:"] + [f"    - {s.name}" for s in m.shards]
    lines += ["dataset_info:", "  features:", "  - name: cls", "    dtype:", "      class_label:", "        names:"]
    lines += [f"          '{i}': {json.dumps(c)}" for i, c in enumerate(meta.classes)]
    struct = _hf_json_struct(example or {})
    lines += (["  - name: json", "    struct:"] + struct) if struct else ["  - name: json", "    dtype: binary"]
    if meta.spec_shape:
        lines += ["  - name: spec.npy", "    dtype:", "      array2_d:",
                  f"        shape: [{meta.spec_shape[0]}, {meta.spec_shape[1]}]", f"        dtype: {meta.spec_dtype}"]
    for i in range(max(1, meta.max_frames or 1)):
        lines += [f"  - name: {frame_name(i)}", "    dtype: image"]
    lines += ["  - name: __key__", "    dtype: string", "  - name: __url__", "    dtype: string", "  splits:"]
    for split, m in manifests.items():
        lines += [f"  - name: {split}", f"    num_bytes: {sum(s.bytes for s in m.shards)}",
                  f"    num_examples: {m.num_samples}"]
    lines += ["---", "", f"# {meta.name or 'dataset'}", "",
              ("Written by `avprep extract`: WebDataset shards, one sample per clip (`cls` label index, "
               f"`json` metadata, `spec.npy` {meta.spec_dtype} spectrogram of shape {list(meta.spec_shape or [])}, "
               f"frames `f000.jpg`...; at most {meta.max_frames} frames). Sample index with byte offsets: "
               "`<split>.samples.jsonl`; wids index: `<split>.wids.json`."), ""]
    return ("\n".join(lines) + "\n").encode("utf-8")


def write_card(out, meta: DatasetMeta, manifests: dict[str, Manifest], write, open_shard=None) -> None:
    """``OUT/README.md``, its json struct taken from the first sample of the first shard, read
    with ``open_shard(name)`` (a binary stream; default: the file in ``out``)."""
    from pathlib import Path

    example = None
    for m in manifests.values():
        if m.shards:
            path = Path(out) / m.shards[0].name
            with (open_shard(path.name) if open_shard else open(path, "rb")) as f:
                for s in read_shard_samples(f, str(path), crc=False, keep=lambda ext: ext == JSON):
                    try:
                        example = json.loads(bytes(s.members.get(JSON, b"{}")))
                    except ValueError:
                        example = None
                    break
            break
    write(Path(out) / CARD, dataset_card(meta, manifests, example if isinstance(example, dict) else None))
