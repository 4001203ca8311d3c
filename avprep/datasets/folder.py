"""Any class-per-folder tree: ``RAW/<class>/<file>`` or ``RAW/<split>/<class>/<file>`` (SPEC §2).

The split layout is used when every top-level folder is a split name (train, val/valid/
validation, test); a mix of split and other folders is a layout error (is ``test`` a class?).
Files are whatever PyAV might open: hidden files and obvious non-media (text, JSON, CSV,
images, archives, ...) are skipped and counted. Classes are the sorted class folder names.

Keys come from the file stem: ``make_key`` plus, where the stem is not plain ASCII, an ASCII
transliteration and a short hash of the original stem (so ``日本.mp4`` and ``中国.mp4`` stay
apart); two classes sharing a stem get the class folder's short hash appended. The same
stem twice in one class (two containers of one clip) or in two splits is a "duplicate"
Problem. Source paths are kept exactly as on disk (spaces, non-ASCII).

Splits: the tree's; without split folders (or without a val folder), by hash of
``<class>/<file name>``, so a file's split does not depend on its key or on other files.
"""
from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from pathlib import Path

from ..errors import ConfigError, DatasetLayoutError
from ._base import (
    SPLITS,
    VAL_FRACTION,
    Clip,
    Discovery,
    dedupe,
    derived_val_note,
    finish,
    hash_fraction,
    hash_split,
    is_media_name,
    make_key,
    split_alias,
    subdirs,
)

NAME = "folder"
LAYOUT = "RAW/<class>/<file> or RAW/<split>/<class>/<file> (any container PyAV opens)"
NUM_CLASSES = None
DEFAULT_DURATION = 10.0
_NOT_ASCII = re.compile(r"[^A-Za-z0-9_-]+")


def discover(src: Path, *, split_files=(), split_by=None, seed=0) -> Discovery:
    """Clips of a class-per-folder tree (see the module docstring)."""
    src = Path(src)
    if split_files or split_by is not None:
        raise ConfigError(f"{NAME}: split files and --split-by are not supported (use split folders)")
    entries, skipped = _scan(src)
    classes = sorted({cls for _, cls, _ in entries})
    has_splits = any(split for split, _, _ in entries)
    splits_present = {split for split, _, _ in entries}
    derive = has_splits and "train" in splits_present and "val" not in splits_present
    stems: dict[str, set[str]] = {}
    for _, cls, path in entries:
        stems.setdefault(_stem_key(path.stem), set()).add(cls)
    clips = []
    for split, cls, path in entries:
        unit = f"{cls}/{path.name}"
        if split is None:
            split = hash_split(unit, seed)
        elif derive and split == "train" and hash_fraction("val:" + unit, seed) < VAL_FRACTION:
            split = "val"
        key = _stem_key(path.stem)
        if len(stems[key]) > 1:
            key = f"{key}_{_short_hash(cls)}"
        clips.append(Clip(key, cls, split, path))
    notes = []
    if not has_splits:
        notes.append(f"no split folders: splits by hash of <class>/<file> (seed {seed}), 10% test, the rest 9:1")
    elif derive:
        notes.append(derived_val_note("the tree", seed).replace("of the key", "of <class>/<file>"))
    clips, dups = dedupe(clips, src)
    return finish(NAME, classes, clips, dups, skipped, DEFAULT_DURATION, notes)


def _stem_key(stem: str) -> str:
    """``make_key(stem)``, made ASCII (plus a hash of the original) when the stem is not."""
    key = make_key(stem)
    if key.isascii():
        return key
    ascii_ = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    return make_key(_NOT_ASCII.sub("_", ascii_) + "_" + _short_hash(stem))


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _scan(src: Path) -> tuple[list[tuple[str | None, str, Path]], dict[str, int]]:
    """(split, class, path) of the media files in priority order, and what was skipped."""
    if not src.is_dir():
        raise DatasetLayoutError(f"{src}: no such folder; expected {LAYOUT}")
    top = subdirs(src)
    splits = [split_alias(d.name) in SPLITS for d in top]
    if any(splits) and not all(splits):
        raise DatasetLayoutError(
            f"{src}: mixes split folders ({', '.join(d.name for d, s in zip(top, splits) if s)}) with "
            f"other folders ({', '.join(d.name for d, s in zip(top, splits) if not s)}); expected {LAYOUT}")
    if top and all(splits):
        order = sorted(top, key=lambda d: (SPLITS.index(split_alias(d.name)), d.name))
        class_dirs = [(split_alias(d.name), c) for d in order for c in subdirs(d)]
    else:
        class_dirs = [(None, d) for d in top]
    if not class_dirs:
        raise DatasetLayoutError(f"{src}: no class folders; expected {LAYOUT}")
    entries, skipped = [], {"not a media file": 0, "file outside a class folder": 0}
    for split, d in class_dirs:
        for root, dirs, names in os.walk(d, followlinks=True):
            dirs[:] = sorted(x for x in dirs if not x.startswith((".", "__")))
            for name in sorted(names):
                if name.startswith("."):
                    continue
                if is_media_name(name):
                    entries.append((split, d.name, Path(root) / name))
                else:
                    skipped["not a media file"] += 1
    for d in [src, *(d for d in top if split_alias(d.name) in SPLITS)]:
        skipped["file outside a class folder"] += sum(
            1 for e in os.scandir(d) if e.is_file() and not e.name.startswith(".") and is_media_name(e.name))
    return entries, skipped
