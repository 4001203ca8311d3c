"""The files ``avprep download`` leaves in the raw folder, their one owner:

- ``RAW/download.jsonl``: one ``ClipStatus`` line per attempt outcome, appended (and fsynced)
  as clips finish; the last line of a key wins, a torn last line is ignored. Statuses:
  ``ok``, ``unavailable``, ``private``, ``removed``, ``geo-blocked``, ``too-short``,
  ``no-audio`` (final: a rerun skips them unless asked) and ``error`` (with its message;
  a rerun tries again).
- ``RAW/availability.json``: the ``Availability`` summary per split and class, rewritten at the
  end of every run; ``avprep extract`` carries it into dataset.json and its report.
- ``RAW/.avprep-download/``: the lock and ``tmp/``, where clips are written before their
  rename into the layout (hidden: no adapter reads it, so a killed run leaves no partial file
  where extraction looks).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATUS_FILE = "download.jsonl"
AVAILABILITY_FILE = "availability.json"
STATE_DIR = ".avprep-download"
TMP_DIR = "tmp"

OK = "ok"
FINAL = ("unavailable", "private", "removed", "geo-blocked", "too-short", "no-audio")
STATUSES = (OK, *FINAL, "error")


@dataclass(frozen=True)
class ClipStatus:
    """How one clip's download ended."""

    key: str
    status: str                 # one of STATUSES
    message: str = ""           # why (the yt-dlp / FFmpeg message for failures)
    attempts: int = 0           # fetch attempts this run (0: found on disk, or not tried)
    duration: float | None = None   # seconds of the written clip (ok)
    size: int | None = None         # its bytes

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def read_statuses(raw) -> dict[str, ClipStatus]:
    """The latest status of every key in ``RAW/download.jsonl`` (none: {})."""
    path = Path(raw) / STATUS_FILE
    out: dict[str, ClipStatus] = {}
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return out
    for line in data.splitlines():
        try:
            d = json.loads(line)
            st = ClipStatus(**{k: d[k] for k in ("key", "status", "message", "attempts", "duration", "size")})
        except (ValueError, KeyError, TypeError):
            continue        # a torn last line (killed while appending) or a foreign line
        if st.status in STATUSES:
            out[st.key] = st
    return out


class StatusLog:
    """Appends status lines to ``RAW/download.jsonl``, each flushed and fsynced."""

    def __init__(self, raw):
        self.path = Path(raw) / STATUS_FILE
        self._f = open(self.path, "ab")
        if self._f.tell():                  # a torn last line must not swallow the next record
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._f.write(b"\n")

    def append(self, st: ClipStatus) -> None:
        self._f.write(st.to_json())
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- availability

@dataclass
class SplitAvailability:
    listed: int
    available: int
    per_class: dict[str, list[int]]         # class -> [available, listed]
    statuses: dict[str, int]

    @property
    def fraction(self) -> float:
        return self.available / self.listed if self.listed else 0.0

    def smallest_class(self) -> tuple[str, float] | None:
        """The class with the lowest available fraction (first by name on ties)."""
        if not self.per_class:
            return None
        name = min(sorted(self.per_class), key=lambda c: self.per_class[c][0] / self.per_class[c][1])
        a, n = self.per_class[name]
        return name, a / n


@dataclass
class Availability:
    """``availability.json``: what a download list asked for and what could be had."""

    dataset: str
    splits: dict[str, SplitAvailability]
    statuses: dict[str, int]                  # over every listed clip
    lists: list[dict] = field(default_factory=list)   # {"name", "sha256"} of each list file
    split_registry: dict | None = None        # the registry entry the lists are (splits.Match.record)
    available_sha256: str = ""                # sha256 of the sorted available keys, one per line

    @property
    def listed(self) -> int:
        return sum(s.listed for s in self.splits.values())

    @property
    def available(self) -> int:
        return sum(s.available for s in self.splits.values())

    @classmethod
    def build(cls, dataset: str, clips, statuses: dict[str, ClipStatus], lists: list[dict],
              split_registry: dict | None = None) -> Availability:
        """From the listed ``clips`` (``RemoteClip``s) and the latest ``statuses`` (a clip without
        one counts as not tried: status "error")."""
        splits: dict[str, SplitAvailability] = {}
        total: dict[str, int] = {}
        available = []
        for c in clips:
            status = statuses[c.key].status if c.key in statuses else "error"
            sp = splits.setdefault(c.split, SplitAvailability(0, 0, {}, {}))
            counts = sp.per_class.setdefault(c.label, [0, 0])
            counts[1] += 1
            sp.listed += 1
            sp.statuses[status] = sp.statuses.get(status, 0) + 1
            total[status] = total.get(status, 0) + 1
            if status == OK:
                counts[0] += 1
                sp.available += 1
                available.append(c.key)
        digest = hashlib.sha256("".join(f"{k}\n" for k in sorted(available)).encode("utf-8")).hexdigest()
        splits = _split_order(splits)
        for sp in splits.values():
            sp.per_class = dict(sorted(sp.per_class.items()))
            sp.statuses = _in_order(sp.statuses)
        return cls(dataset, splits, _in_order(total), lists, split_registry, digest)

    def lines(self) -> list[str]:
        """One line per split, e.g. ``kinetics-sounds train: 12,104 of 14,799 available (81.8%),
        31 classes, smallest class 61%``."""
        out = []
        for name, sp in self.splits.items():
            line = f"{self.dataset} {name}: {sp.available:,} of {sp.listed:,} available ({sp.fraction:.1%}), "
            line += f"{len(sp.per_class)} classes"
            smallest = sp.smallest_class()
            if smallest is not None:
                line += f", smallest class {smallest[1]:.0%}"
            out.append(line)
        return out

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "listed": self.listed, "available": self.available,
                "statuses": dict(self.statuses), "lists": list(self.lists), "split_registry": self.split_registry,
                "available_sha256": self.available_sha256,
                "splits": {s: {"listed": sp.listed, "available": sp.available, "statuses": dict(sp.statuses),
                               "classes": len(sp.per_class), "per_class": {c: list(v) for c, v in sp.per_class.items()}}
                           for s, sp in self.splits.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> Availability:
        splits = {s: SplitAvailability(int(v["listed"]), int(v["available"]),
                                       {c: [int(a), int(n)] for c, (a, n) in v["per_class"].items()},
                                       {k: int(n) for k, n in v.get("statuses", {}).items()})
                  for s, v in d["splits"].items()}
        statuses = _in_order({k: int(n) for k, n in d.get("statuses", {}).items()})
        return cls(str(d["dataset"]), _split_order(splits), statuses, list(d.get("lists", [])),
                   d.get("split_registry"), str(d.get("available_sha256", "")))


def _split_order(splits: dict) -> dict:
    order = {s: i for i, s in enumerate(("train", "val", "test"))}
    return {s: splits[s] for s in sorted(splits, key=lambda s: (order.get(s, 3), s))}


def _in_order(counts: dict[str, int]) -> dict[str, int]:
    return {s: counts[s] for s in STATUSES if counts.get(s)}


def read_availability(raw) -> Availability | None:
    """``RAW/availability.json``, or None when there is none. A file that cannot be read as one
    raises ValueError naming it."""
    path = Path(raw) / AVAILABILITY_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return Availability.from_dict(json.loads(data))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not an availability record ({type(e).__name__}: {e})") from None


def write_availability(raw, availability: Availability) -> None:
    from ..shards import atomic_write_bytes

    data = (json.dumps(availability.to_dict(), indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    atomic_write_bytes(Path(raw) / AVAILABILITY_FILE, data)
