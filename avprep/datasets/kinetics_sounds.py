"""Kinetics-Sounds: the 31 KS classes of a Kinetics tree (README: Datasets).

Layout ``RAW/<split>/<class_name>/<youtube_id>_<start:06d>_<end:06d>.mp4`` with split folders
``train``, ``val``/``validation``, ``test``; class folders may use spaces for underscores.
``RAW/<class_name>/<file>`` (no split folders) is accepted too and then split by hash of the
file stem. Files of other Kinetics classes are counted in ``skipped``, not reported.

Splits: the tree's own; a tree without a val folder gets val = 10% of train by hash. With split
files (OGM-GE lists or the TPAMI JSON, see ``splitfiles``) the files decide split and label:
listed clips are looked up anywhere in the tree (the split folder they sit in is ignored),
first by file stem, then by (youtube id, start), then by youtube id alone when the id's
suffix is a single number and the tree has exactly one file of that video. A listed clip
whose class folder disagrees with the file's label is a "label" Problem, one with no file a
"missing" Problem; tree files not listed are counted in ``skipped``. Keys are file stems.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from manifests import load as _load_manifest

from ..errors import ConfigError, DatasetLayoutError
from . import splitfiles
from ._base import (
    SPLITS,
    Adapter,
    Clip,
    Discovery,
    DownloadPlan,
    Problem,
    RemoteClip,
    SynthClip,
    SynthLayout,
    dedupe,
    derive_val,
    derived_val_note,
    finish,
    hash_split,
    is_media_name,
    make_key,
    rel,
    split_alias,
    subdirs,
    synth_labels,
    synth_split,
    synth_youtube_id,
)

NAME = "kinetics-sounds"
LAYOUT = "RAW/<split>/<class_name>/<youtube_id>_<start:06d>_<end:06d>.mp4 (31 KS classes; others skipped)"
CLASSES: list[str] = list(_load_manifest("kinetics-sounds")["classes"])
NUM_CLASSES = len(CLASSES)
_OTHER = "class not in Kinetics-Sounds"


@dataclass(frozen=True)
class _File:
    path: Path
    split: str | None      # from the split folder; None in the flat layout
    cls: str               # normalized class folder name
    stem: str


def discover(src: Path, *, split_files=(), split_by=None, seed=0) -> Discovery:
    """Kinetics-Sounds clips of ``src`` (see the module docstring)."""
    src = Path(src)
    if split_by is not None:
        raise ConfigError(f"{NAME}: --split-by is not supported (only cremad has speakers)")
    files, skipped = _scan(src)
    if split_files:
        return _from_split_files(src, files, skipped, split_files, seed)
    notes, clips = [], []
    for f in files:
        if f.cls not in CLASSES:
            skipped[_OTHER] = skipped.get(_OTHER, 0) + 1
        else:
            clips.append(Clip(make_key(f.stem), f.cls, f.split or hash_split(f.stem, seed), f.path))
    if files and files[0].split is None:
        notes.append(f"no split folders: splits by hash of the file stem (seed {seed}), "
                     f"10% test, the rest 9:1 train/val")
    elif "train" in {f.split for f in files} and "val" not in {f.split for f in files}:
        clips = derive_val(clips, seed)
        notes.append(derived_val_note("the tree", seed))
    clips, dups = dedupe(clips, src)
    return finish(NAME, CLASSES, clips, dups, skipped, ADAPTER.default_duration, notes)


def _from_split_files(src, files, skipped, split_files, seed) -> Discovery:
    source = splitfiles.read_split_files(split_files, CLASSES)
    problems = list(source.problems)
    by_stem: dict[str, list[_File]] = {}
    by_video: dict[str, list[tuple[int | None, _File]]] = {}
    for f in files:
        by_stem.setdefault(f.stem, []).append(f)
        parsed = splitfiles.parse_clip_id(f.stem)
        if parsed:
            by_video.setdefault(parsed[0], []).append((parsed[1], f))
    clips, used = [], set()
    for e in source.entries:
        found = _lookup(e, by_stem, by_video)
        if found is None:
            problems.append(Problem(make_key(e.clip_id), e.source, "missing",
                                    f"listed clip {e.clip_id} has no video file under {src}"))
            continue
        used.add(found.path)
        if found.cls != e.label:
            problems.append(Problem(make_key(found.stem), rel(found.path, src), "label",
                                    f"{e.source} labels it {e.label} but it is in class folder {found.cls}"))
            continue
        clips.append(Clip(make_key(found.stem), e.label, e.split, found.path, meta={"listed_as": e.clip_id}))
    for f in files:
        if f.path not in used:
            reason = "not in split files" if f.cls in CLASSES else _OTHER
            skipped[reason] = skipped.get(reason, 0) + 1
    notes = ["splits from " + ", ".join(source.files)]
    if source.needs_val:
        clips = derive_val(clips, seed)
        notes.append(derived_val_note("the split files", seed))
    clips, dups = dedupe(clips, src)
    return finish(NAME, CLASSES, clips, problems + dups, skipped, ADAPTER.default_duration, notes)


def _lookup(entry, by_stem, by_video) -> _File | None:
    """The tree file a listed id names (module docstring); prefers one in the listed class."""
    candidates = by_stem.get(entry.clip_id)
    parsed = splitfiles.parse_clip_id(entry.clip_id)
    if not candidates and parsed:
        video, start, end = parsed
        files = by_video.get(video, [])
        candidates = [f for s, f in files if start is not None and s == start]
        if not candidates and end is None and len({f.stem for _, f in files}) == 1:
            candidates = [f for _, f in files]
    if not candidates:
        return None
    return next((f for f in candidates if f.cls == entry.label), candidates[0])


def _scan(src: Path) -> tuple[list[_File], dict[str, int]]:
    """Media files of the tree in priority order (split, class, name) and counts of what was skipped."""
    if not src.is_dir():
        raise DatasetLayoutError(f"{src}: no such folder; expected {LAYOUT}")
    top = subdirs(src)
    split_dirs = [(split_alias(d.name), d) for d in top if split_alias(d.name) in SPLITS]
    if split_dirs:
        split_dirs.sort(key=lambda sd: (SPLITS.index(sd[0]), sd[1].name))
        class_dirs = [(split, c) for split, d in split_dirs for c in subdirs(d)]
    else:
        class_dirs = [(None, c) for c in top]
    if not class_dirs:
        raise DatasetLayoutError(f"{src}: no class folders; expected {LAYOUT}")
    files, not_media = [], 0
    for split, d in class_dirs:
        cls = d.name.strip().lower().replace(" ", "_")
        for name in sorted(os.listdir(d)):
            path = d / name
            if not path.is_file():
                continue
            if is_media_name(name):
                files.append(_File(path, split, cls, Path(name).stem))
            elif not name.startswith("."):
                not_media += 1
    files.sort(key=lambda f: (SPLITS.index(f.split) if f.split else 0, f.cls, f.path.name))
    return files, {"not a media file": not_media}


# ----------------------------------------------------------------------------- download

_KINETICS_HEADER = ("label", "youtube_id", "time_start", "time_end", "split")


def _download_plan(lists, **options) -> DownloadPlan:
    """The KS clips of Kinetics annotation CSVs (``label,youtube_id,time_start,time_end,split``,
    other classes skipped) or of split files (the OGM-GE lists, the TPAMI JSON: windows from
    the ids, 10 s when an id has only its start), laid out as ``<split>/<class>/<stem>.mp4``."""
    if options.get("segments"):
        raise ConfigError(f"{NAME}: --segments is for AVE (Kinetics lists have each clip's window)")
    rows, skipped = [], {}
    for path in map(Path, lists):
        try:
            head = path.read_text(encoding="utf-8-sig").lstrip()[:200].lower()
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetLayoutError(f"{path}: cannot read the list ({e})") from None
        if head.startswith(",".join(_KINETICS_HEADER)):
            rows += _kinetics_rows(path, skipped)
            continue
        for entry in splitfiles.read_split_files([path], CLASSES).entries:
            parsed = splitfiles.parse_clip_id(entry.clip_id)
            if parsed is None or parsed[1] is None:
                raise DatasetLayoutError(f"{entry.source}: {entry.clip_id!r} has no start second "
                                         f"(<youtube_id>_<start>)")
            ytid, start, end = parsed[0], parsed[1], parsed[2] if parsed[2] is not None else parsed[1] + 10
            rows.append((ytid, start, end, entry.label, entry.split, entry.source))
    clips, seen = [], set()
    for ytid, start, end, label, split, _where in rows:
        stem = f"{ytid}_{start:06d}_{end:06d}"
        if stem in seen:
            skipped["listed twice"] = skipped.get("listed twice", 0) + 1
            continue
        seen.add(stem)
        clips.append(RemoteClip(make_key(stem), ytid, float(start), float(end), label, split,
                                f"{split}/{label}/{stem}.mp4"))
    return DownloadPlan(clips, skipped=skipped)


def _kinetics_rows(path: Path, skipped: dict[str, int]):
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        for n, row in enumerate(reader, 2):
            try:
                label = row["label"].strip().lower().replace(" ", "_")
                split = split_alias(row["split"])
                start, end = int(float(row["time_start"])), int(float(row["time_end"]))
                ytid = row["youtube_id"].strip()
                if split is None or not ytid or end <= start:
                    raise ValueError
            except (KeyError, ValueError, AttributeError):
                raise DatasetLayoutError(f"{path}:{n}: expected {','.join(_KINETICS_HEADER)}, "
                                         f"got {','.join(str(v) for v in row.values())!r}") from None
            if label not in CLASSES:
                skipped[_OTHER] = skipped.get(_OTHER, 0) + 1
                continue
            yield ytid, start, end, label, split, f"{path.name}:{n}"


# ----------------------------------------------------------------------------- synthetic tree

def _synth(out: Path, clips: int, k: int, rng, duration, **_) -> tuple[list[str], list[SynthClip]]:
    classes = CLASSES[:k]
    plans = []
    for label in synth_labels(clips, k, rng):
        start = int(rng.integers(0, 290))
        name = f"{synth_youtube_id(rng)}_{start:06d}_{start + 10:06d}.mp4"
        plans.append(SynthClip(out / synth_split(rng) / classes[label] / name, label,
                           10.0 if duration is None else duration))
    return classes, plans


ADAPTER = Adapter(NAME, LAYOUT, NUM_CLASSES, 10.0, discover,
                  SynthLayout(_synth, default_classes=31, max_classes=31), _download_plan)
