"""Samples of a shard: members grouped by key with their byte span and CRC-32 (``read_shard_samples``,
``parse_sample_bytes``), the members no sample may hold, and the safe decoders of the members
(``parse_cls``, ``parse_spec`` with its ``.npy`` header parser, ``open_jpeg``). Nothing is ever unpickled."""
from __future__ import annotations

import ast
import io
import math
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .errors import ShardDataError
from .names import CORE_MEMBERS, FRAME, MAX_PIXELS, is_refused, split_name, unsafe_name
from .tar import TarReader


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
