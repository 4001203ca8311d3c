"""CREMA-D: ``RAW/VideoFlash/<clip>.flv`` + ``RAW/AudioWAV/<clip>.wav`` (README: Datasets).

Clip names are ``<actor>_<sentence>_<EMO>_<level>``; the label is the EMO field. Audio comes
from the WAV when there is one, else from the FLV's own track (``Clip.audio = None``).

Splits: the dataset has none. Without split files every clip goes to train/val/test by a hash
of its name (10% test, the rest 9:1), or, with ``split_by="speaker"``, by a hash of its actor
id so no actor is in two splits (the clip split leaks speakers between train and test). With
the OGM-GE CSVs (train and test only) val is 10% of their train, by hash of the clip name.
"""
from __future__ import annotations

import os
from pathlib import Path

from manifests import load as _load_manifest

from ..errors import ConfigError, DatasetLayoutError
from . import splitfiles
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
    is_media_name,
    make_key,
    synth_labels,
)

NAME = "cremad"
LAYOUT = "RAW/VideoFlash/<actor>_<sentence>_<EMO>_<level>.flv (+ RAW/AudioWAV/<same>.wav)"
CLASSES: list[str] = list(_load_manifest("cremad")["classes"])
NUM_CLASSES = len(CLASSES)
SPLIT_BY = ("clip", "speaker")


def discover(src: Path, *, split_files=(), split_by=None, seed=0) -> Discovery:
    """CREMA-D clips of ``src`` (see the module docstring for how splits are made)."""
    src = Path(src)
    if split_by not in (None, *SPLIT_BY):
        raise ConfigError(f"cremad: --split-by must be one of {', '.join(SPLIT_BY)}, not {split_by!r}")
    if split_by is not None and split_files:
        raise ConfigError("cremad: --split-by and split files are exclusive (the files fix the splits)")
    videos = _index(src / "VideoFlash", required=True)
    wavs = _index(src / "AudioWAV", required=False)
    if split_files:
        clips, problems, skipped, notes = _listed_clips(src, videos, wavs, split_files, seed)
    else:
        clips, problems, skipped, notes = _hashed_clips(videos, wavs, split_by, seed)
    missing_wav = sum(1 for c in clips if c.audio is None)
    if missing_wav:
        notes.append(f"{missing_wav} clips have no WAV: their audio comes from the FLV")
    clips, dups = dedupe(clips, src)
    return finish(NAME, CLASSES, clips, problems + dups, skipped, ADAPTER.default_duration, notes)


def _clip(name: str, label: str, split: str, videos: dict[str, Path], wavs: dict[str, Path]) -> Clip:
    return Clip(make_key(name), label, split, videos[name], wavs.get(name), {"speaker": name.split("_")[0]})


def _listed_clips(src: Path, videos: dict[str, Path], wavs: dict[str, Path], split_files, seed: int):
    """The clips the split files list: (clips, problems, skipped, notes)."""
    source = splitfiles.read_split_files(split_files, CLASSES)
    problems: list[Problem] = list(source.problems)
    clips = []
    for e in source.entries:
        if e.clip_id not in videos:
            problems.append(Problem(make_key(e.clip_id), f"VideoFlash/{e.clip_id}.flv", "missing",
                                    f"listed in {e.source} but not in {src / 'VideoFlash'}"))
        elif _emotion(e.clip_id) != e.label:
            problems.append(Problem(make_key(e.clip_id), e.source, "label",
                                    f"{e.source} says {e.label} but the clip name says {_emotion(e.clip_id)}"))
        else:
            clips.append(_clip(e.clip_id, e.label, e.split, videos, wavs))
    listed = {e.clip_id for e in source.entries} | {p.key for p in source.problems}
    skipped = {"not in split files": sum(1 for name in videos if name not in listed)}
    notes = []
    if source.needs_val:
        clips = derive_val(clips, seed)
        notes.append(derived_val_note("the split files", seed))
    notes.append("splits from " + ", ".join(source.files))
    return clips, problems, skipped, notes


def _hashed_clips(videos: dict[str, Path], wavs: dict[str, Path], split_by: str | None, seed: int):
    """Every clip, split by the hash of its name or its actor's id: (clips, problems, skipped, notes)."""
    clips, problems = [], []
    for name in sorted(videos):
        label = _emotion(name)
        if label not in CLASSES:
            problems.append(Problem(make_key(name), f"VideoFlash/{videos[name].name}", "label",
                                    f"emotion {label!r} of {name!r} is not one of {', '.join(CLASSES)}"))
            continue
        unit = name.split("_")[0] if split_by == "speaker" else name
        clips.append(_clip(name, label, hash_split(unit, seed), videos, wavs))
    notes = [f"splits by hash of the {'actor id' if split_by == 'speaker' else 'clip name'} "
             f"(seed {seed}): 10% test, the rest 9:1 train/val"]
    return clips, problems, {}, notes


def _emotion(name: str) -> str:
    parts = name.split("_")
    return parts[2] if len(parts) >= 3 else ""


def _index(folder: Path, *, required: bool) -> dict[str, Path]:
    """Clip name -> file of ``folder`` (first by name when one clip has several extensions)."""
    if not folder.is_dir():
        if required:
            raise DatasetLayoutError(f"{folder}: no such folder; expected CREMA-D's "
                                     f"VideoFlash/<clip>.flv (and AudioWAV/<clip>.wav) under {folder.parent}")
        return {}
    out: dict[str, Path] = {}
    with os.scandir(folder) as entries:     # is_file() from the directory entry: no stat per file
        names = sorted(e.name for e in entries if is_media_name(e.name) and e.is_file())
    for name in names:
        out.setdefault(name[:name.rfind(".")], folder / name)
    return out


# ----------------------------------------------------------------------------- synthetic tree

_CREMAD_SENTENCES = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")
_CREMAD_LEVELS = ("LO", "MD", "HI")
_CREMAD_NAMES_PER_CLASS = 91 * len(_CREMAD_SENTENCES)      # actors x sentences (one level each)


def _synth(out: Path, clips: int, k: int, rng, duration, **_) -> tuple[list[str], list[SynthClip]]:
    classes = CLASSES[:k]
    plans, seen = [], set()
    for label in synth_labels(clips, k, rng):
        while True:
            actor = int(rng.integers(1001, 1092))
            sentence = str(rng.choice(_CREMAD_SENTENCES))
            emo = classes[label]
            level = "XX" if sentence != "IEO" or emo == "NEU" else str(rng.choice(_CREMAD_LEVELS))
            name = f"{actor}_{sentence}_{emo}_{level}"
            if name not in seen:
                break
        seen.add(name)
        d = duration if duration is not None else round(float(rng.uniform(2.0, 4.0)), 1)
        plans.append(SynthClip(out / "VideoFlash" / f"{name}.flv", label, d,
                           out / "AudioWAV" / f"{name}.wav"))
    return classes, plans


ADAPTER = Adapter(NAME, LAYOUT, NUM_CLASSES, 3.0, discover,
                  SynthLayout(_synth, default_classes=6, max_classes=6,
                              max_clips_per_class=_CREMAD_NAMES_PER_CLASS))
