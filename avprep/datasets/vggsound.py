"""VGGSound: ``RAW/vggsound.csv`` + videos anywhere under RAW (README: Datasets).

The CSV has no header; rows are ``youtube_id,start_seconds,label,split`` with split ``train``
or ``test`` (labels with commas are quoted, hence the csv module). Videos are named
``<youtube_id>_<start:06d>.mp4``; an unpadded start, a ``_<end>`` suffix and other video
containers are accepted too. The tree is indexed once, so 200k rows cost one walk.

Classes are the sorted unique labels of the whole CSV (so they do not depend on which videos
were downloaded). Rows without a video are "missing" Problems: VGGSound always has many.
The CSV only has train/test, so val is 10% of train by hash of the key (recorded in notes).
"""
from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

from ..errors import ConfigError, DatasetLayoutError
from . import splitfiles
from ._base import (
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
    is_media_name,
    make_key,
    split_alias,
    synth_labels,
    synth_split,
    synth_youtube_id,
)

NAME = "vggsound"
LAYOUT = "RAW/vggsound.csv (youtube_id,start_seconds,label,split) + RAW/**/<youtube_id>_<start:06d>.mp4"
NUM_CLASSES = None
CSV = "vggsound.csv"
_ANY_ID = re.compile(r"(.+)_(\d+)")


def discover(src: Path, *, split_files=(), split_by=None, seed=0) -> Discovery:
    """VGGSound clips of ``src`` (see the module docstring)."""
    src = Path(src)
    if split_files or split_by is not None:
        raise ConfigError(f"{NAME}: split files and --split-by are not supported (the CSV has the split)")
    rows = read_csv(src / CSV)
    classes = sorted({label for *_, label, _split in rows})
    videos = _index(src)
    clips, problems = [], []
    for line, ytid, start, label, split in rows:
        key = make_key(f"{ytid}_{start:06d}")
        path = videos.get((ytid, start))
        if path is None:
            problems.append(Problem(key, f"{CSV}:{line}", "missing",
                                    f"no video {ytid}_{start:06d}.mp4 under {src}"))
        else:
            clips.append(Clip(key, label, split, path, meta={"youtube_id": ytid, "start": start}))
    clips = derive_val(clips, seed)
    notes = [derived_val_note(CSV, seed)]
    clips, dups = dedupe(clips, src)
    return finish(NAME, classes, clips, problems + dups, {}, ADAPTER.default_duration, notes)


def read_csv(path: Path) -> list[tuple[int, str, int, str, str]]:
    """(line, youtube_id, start, label, split) rows; a header-like first row is tolerated."""
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: not found; expected {LAYOUT}")
    rows = []
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        for n, row in enumerate(csv.reader(f), 1):
            row = [x.strip() for x in row]
            if not any(row):
                continue
            ok = len(row) == 4 and row[1].isdigit() and split_alias(row[3]) in ("train", "test") and row[2]
            if not ok:
                if n == 1 and not (len(row) > 1 and row[1].isdigit()):
                    continue        # a header some copies add
                raise DatasetLayoutError(f"{path}:{n}: expected 'youtube_id,start_seconds,label,train|test', "
                                         f"got {','.join(row)!r}")
            split = split_alias(row[3])
            assert split is not None        # checked by ok
            rows.append((n, row[0], int(row[1]), row[2], split))
    if not rows:
        raise DatasetLayoutError(f"{path}: no rows; expected {LAYOUT}")
    return rows


def _index(src: Path) -> dict[tuple[str, int], Path]:
    """(youtube_id, start) -> video, from one walk of the tree; the first path in sorted order wins."""
    out: dict[tuple[str, int], Path] = {}
    for root, dirs, names in os.walk(src, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not is_media_name(name):
                continue
            stem = Path(name).stem
            parsed = splitfiles.parse_clip_id(stem)
            if parsed is None:      # not an 11-character YouTube id: <id>_<start>
                m = _ANY_ID.fullmatch(stem)
                parsed = m and (m.group(1), int(m.group(2)), None)
            if parsed and parsed[1] is not None:
                out.setdefault((parsed[0], parsed[1]), Path(root) / name)
    return out


def _video_path(ytid: str, start: int) -> str:
    """Where a clip goes under RAW: ``video/<first id character>/<ytid>_<start:06d>.mp4``."""
    sub = ytid[0].lower() if ytid[0].isalnum() else "other"
    return f"video/{sub}/{ytid}_{start:06d}.mp4"


# ----------------------------------------------------------------------------- download

def _download_plan(lists, **options) -> DownloadPlan:
    """The clips of the official ``vggsound.csv`` (written into RAW as it is), or of the split
    lists ``train.csv``/``test.csv`` (``<ytid>_<start:06d>.mp4,<label>``, split from the file
    name; RAW gets a vggsound.csv made from them). Each window is 10 s from the start second."""
    if options.get("segments"):
        raise ConfigError(f"{NAME}: --segments is for AVE (the csv has each clip's start)")
    rows, text = [], None
    for path in map(Path, lists):
        try:
            rows += [(ytid, start, label, split) for _, ytid, start, label, split in read_csv(path)]
            text = path.read_bytes() if len(lists) == 1 else None
        except DatasetLayoutError:
            for e in splitfiles.read_split_files([path], None).entries:
                parsed = splitfiles.parse_clip_id(e.clip_id.removesuffix(".mp4"))
                if parsed is None or parsed[1] is None:
                    raise DatasetLayoutError(f"{e.source}: {e.clip_id!r} is not <youtube_id>_<start>.mp4") from None
                rows.append((parsed[0], parsed[1], e.label, e.split))
    if text is None:        # the layout's csv, made from the lists
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        text = buf.getvalue().encode("utf-8")
    clips, seen, dups = [], set(), 0
    for ytid, start, label, split in rows:
        key = make_key(f"{ytid}_{start:06d}")
        if key in seen:
            dups += 1
            continue
        seen.add(key)
        clips.append(RemoteClip(key, ytid, float(start), float(start) + ADAPTER.default_duration, label, split,
                                _video_path(ytid, start)))
    return DownloadPlan(clips, {CSV: text}, skipped={"listed twice": dups})


# ----------------------------------------------------------------------------- synthetic tree

_SYNTH_LABELS = (
    "dog barking", "playing acoustic guitar", "male speech, man speaking", "rain on surface",
    "helicopter", "church bell ringing", "cat meowing", "playing violin, fiddle",
    "ambulance siren", "baby crying", "chainsaw", "playing drum kit", "train horning",
    "lions roaring", "playing piano", "skateboarding", "typing on computer keyboard",
    "wind noise", "waterfall burbling", "people clapping",
)


def _synth(out: Path, clips: int, k: int, rng, duration, missing: int = 0, **_):
    classes = sorted(_SYNTH_LABELS[:k])
    plans, rows = [], []
    for n, label in enumerate(synth_labels(clips + missing, k, rng)):
        ytid, start = synth_youtube_id(rng), int(rng.integers(0, 290))
        split = synth_split(rng, ("train", "test"), (0.8, 0.2))
        rows.append((ytid, start, classes[label], split))
        if n < clips:   # the rest are listed but have no video, as in the real dataset
            plans.append(SynthClip(out / _video_path(ytid, start), label, 10.0 if duration is None else duration))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "vggsound.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    return classes, plans


ADAPTER = Adapter(NAME, LAYOUT, NUM_CLASSES, 10.0, discover,
                  SynthLayout(_synth, default_classes=10, max_classes=len(_SYNTH_LABELS)), _download_plan)
