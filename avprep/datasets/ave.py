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
    annotations = read_annotations(src / "Annotations.txt")
    classes = sorted({row[1] for row in annotations})
    category = {}
    for row in annotations:
        category.setdefault(row[2], row[1])
    listed = set_files(src)
    problems, notes = [], []
    skipped: dict[str, int] = {}
    if listed:
        rows = [(split, *row) for split, path in listed.items() for row in read_annotations(path)]
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
        skipped["not in split files"] = sum(vid not in in_splits for vid in category)
        if "train" in listed and "test" in listed and "val" not in listed:
            clips = derive_val(clips, seed)
            notes.append(derived_val_note("the split files", seed))
    clips, dups = dedupe(clips, src)
    return finish(NAME, classes, clips, problems + dups, skipped, ADAPTER.default_duration, notes)


def set_files(src: Path) -> dict[str, Path]:
    """AVE's own split files in ``src`` (names matched case-insensitively), by split."""
    present = {name.lower(): Path(src) / name for name in os.listdir(src)}
    return {split: present[fname] for split, fname in SPLIT_FILES.items() if fname in present}


def read_annotations(path: Path) -> list[tuple[str, str, str, str, float, float]]:
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


# ----------------------------------------------------------------------------- download

def _download_plan(lists, segments=(), **_) -> DownloadPlan:
    """The videos of ``Annotations.txt`` (and the trainSet/valSet/testSet.txt beside it, copied
    into RAW as they are), each as ``AVE/<VideoID>.mp4``. AVE's lines give the event inside the
    10 s clip, not where the clip is in the YouTube video: that comes from AudioSet's segment
    CSVs (``segments``: ``YTID, start_seconds, end_seconds, labels``), as AVE is drawn from AudioSet."""
    lists = [Path(p) for p in lists]
    annotations = next((p for p in lists if p.name.lower() == "annotations.txt"),
                       lists[0] if len(lists) == 1 else None)
    if annotations is None:
        raise ConfigError(f"{NAME}: pass Annotations.txt as --list (the set files are read beside it)")
    if not segments:
        raise ConfigError(f"{NAME}: Annotations.txt says where each event is inside its 10 s clip, not where the clip "
                          f"is in the YouTube video; pass AudioSet's segment CSVs with --segments, or use the "
                          f"official AVE zip (README: Getting the corpora)")
    windows = _read_segments([Path(p) for p in segments])
    sets = set_files(annotations.parent)
    files = {"Annotations.txt": annotations.read_bytes()} | {p.name: p.read_bytes() for p in sets.values()}
    split_of: dict[str, str] = {}
    for split, path in sets.items():
        for row in read_annotations(path):
            split_of.setdefault(row[2], split)
    clips, seen, notes = [], set(), []
    for _where, category, vid, *_rest in read_annotations(annotations):
        if vid in seen:
            continue
        seen.add(vid)
        start, end = windows.get(vid, (None, None))
        clips.append(RemoteClip(make_key(vid), vid, start, end, category, split_of.get(vid, "all"), f"AVE/{vid}.mp4"))
    missing = sum(1 for c in clips if c.start is None)
    if missing:
        notes.append(f"{missing} video(s) are in none of the --segments files: no window, not fetched")
    unlisted = sum(1 for c in clips if c.split == "all") if sets else 0
    return DownloadPlan(clips, files, notes, {"not in the set files": unlisted})


def _read_segments(paths: list[Path]) -> dict[str, tuple[float, float]]:
    """YTID -> (start, end) of AudioSet segment CSVs (``#`` comment lines; the first segment of a
    video wins)."""
    out: dict[str, tuple[float, float]] = {}
    for path in paths:
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetLayoutError(f"{path}: cannot read segment file ({e})") from None
        for n, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            fields = [f.strip() for f in line.split(",", 3)]
            try:
                out.setdefault(fields[0], (float(fields[1]), float(fields[2])))
            except (IndexError, ValueError):
                raise DatasetLayoutError(f"{path}:{n}: expected 'YTID, start_seconds, end_seconds, labels', "
                                         f"got {line[:80]!r}") from None
    return out


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
    seconds = max(2, int(10.0 if duration is None else duration))      # events lie inside the clip
    for label in synth_labels(clips, k, rng):
        vid = synth_youtube_id(rng)
        start = int(rng.integers(0, seconds - 1))
        end = int(rng.integers(start + 1, seconds + 1))
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
                  SynthLayout(_synth, default_classes=28, max_classes=28), _download_plan)
