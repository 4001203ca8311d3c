"""What every dataset adapter returns, and helpers adapters share.

An adapter is one module exposing::

    NAME: str                      # CLI name, e.g. "cremad"
    LAYOUT: str                    # one-line description of the raw layout (avprep datasets)
    NUM_CLASSES: int | None        # fixed class count, None when derived from the data
    def discover(src: Path, *, split_files=(), split_by=None, seed=0) -> Discovery

``discover`` only looks at names and small text files: no media is opened.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Clip:
    """One raw clip to extract. ``key`` is unique in the dataset and has no dots."""

    key: str
    label: str
    split: str
    video: Path
    audio: Path | None = None      # separate audio file (CREMA-D's WAV); None = video's own track
    meta: dict = field(default_factory=dict, hash=False, compare=False)  # e.g. AVE event segment


@dataclass(frozen=True)
class Problem:
    """A clip that cannot even be attempted (missing file, unknown label, duplicate key)."""

    key: str
    source: str
    stage: str        # "missing", "label", "duplicate"
    error: str


@dataclass
class Discovery:
    name: str
    classes: list[str]
    clips: list[Clip]
    problems: list[Problem] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)   # e.g. {"class not in KS-31": 412}
    default_duration: float | None = None


_KEY_BAD = re.compile(r"[.\s/\\]+")


def make_key(name: str) -> str:
    """A WebDataset-safe key: no dots (they start the extension), no whitespace or slashes."""
    key = _KEY_BAD.sub("_", name).strip("_")
    return key or "clip"


def hash_fraction(name: str, seed: int = 0) -> float:
    """A stable number in [0, 1) from a clip (or speaker) name: adding clips never moves others."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_split(name: str, seed: int = 0, test: float = 0.1, val_of_rest: float = 0.1) -> str:
    """SPEC §2: hold out ``test``, then split the rest ``1-val_of_rest : val_of_rest`` into train/val."""
    x = hash_fraction(name, seed)
    if x < test:
        return "test"
    return "val" if (x - test) / (1 - test) < val_of_rest else "train"
