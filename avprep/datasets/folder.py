"""Any class-per-folder tree: ``RAW/<class>/<file>`` or ``RAW/<split>/<class>/<file>`` (README: Datasets).

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
    Adapter,
    Clip,
    Discovery,
    SynthClip,
    SynthLayout,
    dedupe,
    derived_val_note,
    finish,
    hash_fraction,
    hash_split,
    is_media_name,
    make_key,
    safe_text,
    split_alias,
    subdirs,
    synth_labels,
    synth_split,
)

NAME = "folder"
LAYOUT = "RAW/<class>/<file> or RAW/<split>/<class>/<file> (any container PyAV opens)"
NUM_CLASSES = None
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
    return finish(NAME, classes, clips, dups, skipped, ADAPTER.default_duration, notes)


def _stem_key(stem: str) -> str:
    """``make_key(stem)``, made ASCII (plus a hash of the original) when the stem is not."""
    key = make_key(stem)
    if key.isascii():
        return key
    ascii_ = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    return make_key(_NOT_ASCII.sub("_", ascii_) + "_" + _short_hash(stem))


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _walk(top: Path, inside: Path, seen: set, skipped: dict[str, int]):
    """``top`` and its sub-folders (sorted, depth first, hidden and ``__x`` ones left out),
    following folder links only to folders inside ``inside`` and never into one folder twice
    (a link to a parent would loop; two links to one folder would list its clips twice)."""
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            real = folder.resolve()
            ident = (lambda st: (st.st_dev, st.st_ino))(real.stat())
        except (OSError, RuntimeError):       # a dangling link or a link loop
            skipped["folder link leading outside --src"] += 1
            continue
        if real != inside and inside not in real.parents:
            skipped["folder link leading outside --src"] += 1
            continue
        if ident in seen:
            skipped["folder reached twice (link)"] += 1
            continue
        seen.add(ident)
        yield folder
        try:
            with os.scandir(folder) as it:
                subs = sorted(e.name for e in it if _is_dir(e) and not e.name.startswith((".", "__")))
        except OSError:
            continue
        stack.extend(folder / n for n in reversed(subs))


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
    inside, seen = src.resolve(), set()
    skipped.update({"folder link leading outside --src": 0, "folder reached twice (link)": 0})
    for split, d in class_dirs:
        cls = safe_text(d.name)      # a class name that is not UTF-8 on disk shows its bytes as \xNN
        for folder in _walk(d, inside, seen, skipped):
            with os.scandir(folder) as it:
                names = sorted(e.name for e in it if not e.name.startswith(".") and not _is_dir(e))
            for name in names:
                if is_media_name(name):
                    entries.append((split, cls, folder / name))
                else:
                    skipped["not a media file"] += 1
    for d in [src, *(d for d in top if split_alias(d.name) in SPLITS)]:
        skipped["file outside a class folder"] += sum(
            1 for e in os.scandir(d) if e.is_file() and not e.name.startswith(".") and is_media_name(e.name))
    return entries, skipped


# ----------------------------------------------------------------------------- synthetic tree

_SYNTH_CLASSES = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")


def _synth(out: Path, clips: int, k: int, rng, duration, split_folders: bool = False, **_):
    classes = list(_SYNTH_CLASSES[:k]) if k <= len(_SYNTH_CLASSES) else [f"class{c:03d}" for c in range(k)]
    plans = []
    for n, label in enumerate(synth_labels(clips, k, rng)):
        suffix = (".mp4", ".mkv", ".avi")[n % 3]     # any container PyAV opens
        rel = Path(classes[label]) / f"clip{n:05d}{suffix}"
        if split_folders:
            rel = Path(synth_split(rng)) / rel
        plans.append(SynthClip(out / rel, label, 10.0 if duration is None else duration))
    return classes, plans


ADAPTER = Adapter(NAME, LAYOUT, NUM_CLASSES, 10.0, discover,
                  SynthLayout(_synth, default_classes=5, max_classes=1000))
