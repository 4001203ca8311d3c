"""AVE: ``RAW/Annotations.txt`` + ``RAW/AVE/<VideoID>.mp4`` (README: Datasets).

Lines are ``Category&VideoID&Quality&StartTime&EndTime`` (categories contain commas and
spaces, so fields are split from the right). The header line is optional, as are trailing
whitespace and Windows line ends. Classes are the sorted unique categories of Annotations.txt;
the event segment goes into ``Clip.meta["event"]`` as ``[start, end]`` seconds.

Splits: ``RAW/trainSet.txt``, ``valSet.txt``, ``testSet.txt`` (same format) when present;
annotated videos in none of them are counted in ``skipped``, a split-file row whose category
disagrees with Annotations.txt is a "label" Problem, and with only train and test files val is
10% of train by hash. Without split files: hash of the VideoID (10% test, the rest 9:1).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError, DatasetLayoutError
from ._base import (
    Adapter,
    Clip,
    Discovery,
    Problem,
    SynthClip,
    SynthLayout,
    dedupe,
    derive_val,
    derived_val_note,
    finish,
    hash_split,
    make_key,
    synth_labels,
    synth_split,
    synth_youtube_id,
)

NAME = "ave"
LAYOUT = "RAW/Annotations.txt (Category&VideoID&Quality&StartTime&EndTime) + RAW/AVE/<VideoID>.mp4"
NUM_CLASSES = None
SPLIT_FILES = {"train": "trainset.txt", "val": "valset.txt", "test": "testset.txt"}


def discover(src: Path, *, split_files=(), split_by=None, seed=0) -> Discovery:
    """AVE clips of ``src`` (see the module docstring)."""
    src = Path(src)
    if split_files or split_by is not None:
        raise ConfigError(f"{NAME}: split files and --split-by are not supported "
                          f"(AVE's own trainSet/valSet/testSet.txt are read from the dataset folder)")
    if not (src / "Annotations.txt").is_file():
        raise DatasetLayoutError(f"{src / 'Annotations.txt'}: not found; expected {LAYOUT}")
    if not (src / "AVE").is_dir():
        raise DatasetLayoutError(f"{src / 'AVE'}: no such folder; expected {LAYOUT}")
    annotations = _read(src / "Annotations.txt")
    classes = sorted({row[1] for row in annotations})
    category = {}
    for row in annotations:
        category.setdefault(row[2], row[1])
    present = {name.lower(): src / name for name in os.listdir(src)}
    listed = {split: present[fname] for split, fname in SPLIT_FILES.items() if fname in present}
    problems, skipped, notes = [], {}, []
    if listed:
        rows = [(split, *row) for split, path in listed.items() for row in _read(path)]
        notes.append("splits from " + ", ".join(p.name for p in listed.values()))
    else:
        rows = [(hash_split(row[2], seed), *row) for row in annotations]
        notes.append(f"no split files: splits by hash of the VideoID (seed {seed}), 10% test, the rest 9:1")
    clips = []
    for split, where, cat, vid, quality, start, end in rows:
        key, video = make_key(vid), src / "AVE" / f"{vid}.mp4"
        if cat not in classes or category.get(vid, cat) != cat:
            problems.append(Problem(key, where, "label", f"category {cat!r} of {vid} " + (
                f"disagrees with Annotations.txt ({category[vid]!r})" if cat in classes
                else "is not in Annotations.txt")))
        elif not video.is_file():
            problems.append(Problem(key, f"AVE/{vid}.mp4", "missing", f"{where}: no video {video}"))
        else:
            clips.append(Clip(key, cat, split, video, meta={"event": [start, end], "quality": quality}))
    if listed:
        in_splits = {row[3] for row in rows}
        skipped["not in split files"] = sum(1 for vid in category if vid not in in_splits)
        if "train" in listed and "test" in listed and "val" not in listed:
            clips = derive_val(clips, seed)
            notes.append(derived_val_note("the split files", seed))
    clips, dups = dedupe(clips, src)
    return finish(NAME, classes, clips, problems + dups, skipped, ADAPTER.default_duration, notes)


def _read(path: Path) -> list[tuple[str, str, str, str, float, float]]:
    """(where, category, video_id, quality, start, end) of an AVE annotation file."""
    try:
        lines = path.read_text(encoding="utf-8-sig", errors="surrogateescape").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetLayoutError(f"{path}: cannot read ({e})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        fields = [f.strip() for f in line.rsplit("&", 4)]
        try:
            if len(fields) != 5 or not all(fields[:2]):
                raise ValueError
            start, end = float(fields[3]), float(fields[4])
        except ValueError:
            if n == 1:
                continue        # header: Category&VideoID&Quality&StartTime&EndTime
            raise DatasetLayoutError(f"{path}:{n}: expected 'Category&VideoID&Quality&StartTime&EndTime', "
                                     f"got {line!r}") from None
        rows.append((f"{path.name}:{n}", fields[0], fields[1], fields[2], start, end))
    return rows


# ----------------------------------------------------------------------------- synthetic tree

_SYNTH_CATEGORIES = (
    "Church bell", "Male speech, man speaking", "Bark", "Fixed-wing aircraft, airplane",
    "Race car, auto racing", "Female speech, woman speaking", "Helicopter", "Violin, fiddle",
    "Flute", "Ukulele", "Frying (food)", "Truck", "Shofar", "Motorcycle", "Acoustic guitar",
    "Train horn", "Clock", "Banjo", "Goat", "Baby cry, infant crying", "Bus", "Chainsaw", "Cat",
    "Horse", "Toilet flush", "Rodents, rats, mice", "Accordion", "Mandolin",
)


def _synth(out: Path, clips: int, k: int, rng, duration, **_):
    classes = sorted(_SYNTH_CATEGORIES[:k])
    header = "Category&VideoID&Quality&StartTime&EndTime"
    plans, lines = [], {"train": [], "val": [], "test": []}
    for label in synth_labels(clips, k, rng):
        vid = synth_youtube_id(rng)
        start = int(rng.integers(0, 9))
        end = int(rng.integers(start + 1, 11))
        line = f"{classes[label]}&{vid}&good&{start}&{end}"
        lines[synth_split(rng)].append(line)
        plans.append(SynthClip(out / "AVE" / f"{vid}.mp4", label, 10.0 if duration is None else duration))
    out.mkdir(parents=True, exist_ok=True)
    everything = [ln for split in ("train", "val", "test") for ln in lines[split]]
    (out / "Annotations.txt").write_text("\n".join([header, *sorted(everything)]) + "\n")
    for split, fname in (("train", "trainSet.txt"), ("val", "valSet.txt"), ("test", "testSet.txt")):
        (out / fname).write_text("\n".join([header, *lines[split]]) + "\n")
    return classes, plans


ADAPTER = Adapter(NAME, LAYOUT, NUM_CLASSES, 10.0, discover,
                  SynthLayout(_synth, default_classes=28, max_classes=28))
