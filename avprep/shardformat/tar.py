"""The one streaming tar reader of shards, which never trusts them.

It never trusts a declared size beyond the bytes that are really there (and a per-member limit),
is iterative (no recursion on chained extension headers), and requires the end-of-archive block
and nothing but zeros after it."""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import ShardDataError
from .names import MAX_EXT_BYTES, MAX_EXT_HEADERS, MAX_MEMBER

_BLOCK = 512
_ZERO = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_SKIP = 1 << 16


@dataclass(slots=True)
class _Pending:
    """What extension headers said about the member after them, and where the first one began."""

    name: str | None = None
    size: int | None = None
    start: int | None = None
    count: int = 0


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
        pending = _Pending()
        while True:
            self._skip()
            at = self.pos
            header = self._header()
            if header is None or header == _ZERO:
                self._end(header, at, pending)
                return
            kind, n = self._entry(header, at)
            if pending.start is None:
                pending.start = at
            if kind in (b"L", b"x", b"g"):
                self._extension(kind, n, pending)
                continue
            yield self._member(header, kind, n, at, pending)
            pending = _Pending()

    def _end(self, header: bytes | None, at: int, pending: _Pending) -> None:
        """The end of a slice (``header`` None) or the end-of-archive block (then only zeros)."""
        if header is not None and self.slice:
            self.fail(f"end-of-archive block inside a sample at byte {at}")
        if pending.start is not None:
            self.fail(f"extension header at byte {pending.start} without a member")
        if header is not None:
            self.eoa = at
            self.pos += _BLOCK
            self._trailer()

    def _entry(self, header: bytes, at: int) -> tuple[bytes, int]:
        """(type flag, payload size) of the header at ``at``, its payload left to read or skip."""
        n = self._header_size(header)
        self.pos += _BLOCK
        kind = header[156:157]
        if kind in (b"1", b"2", b"3", b"4", b"5", b"6"):
            n = 0       # links, devices, folders carry no payload whatever the size field says
        elif n > self.max_member:
            self.fail(f"a member of {n} bytes at byte {at}; the limit is {self.max_member >> 20} MiB")
        self.left = n + -n % _BLOCK
        return kind, n

    def _extension(self, kind: bytes, n: int, pending: _Pending) -> None:
        """A GNU long name (``L``) or pax header (``x``; ``g`` is skipped): its name and size hold
        for the next member only."""
        pending.count += 1
        if pending.count > MAX_EXT_HEADERS or n > MAX_EXT_BYTES:
            self.fail(f"{pending.count} extension header(s) of up to {n} bytes before byte {self.pos}")
        if kind == b"L":
            pending.name = _cstr(self.read(n))
        elif kind == b"x":
            pax = self._pax(self.read(n))
            pending.name = str(pax["path"]) if "path" in pax else pending.name
            pending.size = int(pax["size"]) if "size" in pax else pending.size

    def _member(self, header: bytes, kind: bytes, n: int, at: int, pending: _Pending) -> Member:
        name = pending.name if pending.name is not None else _header_name(header)
        start = at if pending.start is None else pending.start
        if kind not in _REGULAR:        # links, directories, devices: not sample members; reported by name
            return Member(name, -1, start)
        if pending.size is not None:
            n = pending.size
            self.left = n + -n % _BLOCK
        if n > self.max_member:
            self.fail(f"a member of {n} bytes at byte {at}; the limit is {self.max_member >> 20} MiB")
        if self.size is not None and self.pos + n > self.size:
            self.fail(f"a member of {n} bytes at byte {at} runs past the end ({self.size} bytes)")
        return Member(name, n, start)

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
