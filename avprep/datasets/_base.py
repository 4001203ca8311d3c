"""What every dataset adapter is and returns, and helpers adapters share.

Each dataset module defines one ``Adapter`` (``ADAPTER``): its CLI name, a one-line raw
layout, its fixed class count (None when derived from the data), the clip length of the
paper's presets (which ``config.spec_preset`` uses), ``discover`` and ``synth``, the plan of a
synthetic raw tree in that layout (``avprep.synth`` writes the media)::

    def discover(src: Path, *, split_files=(), split_by=None, seed=0) -> Discovery

``discover`` only looks at names and small text files: no media is opened. Unusable rows
(missing video, unknown label, duplicate key) become ``Problem``s, deliberate omissions
(e.g. non-KS Kinetics classes) are counted in ``skipped``, and how the splits were made
(e.g. a val split derived from train) is said in ``notes``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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
    notes: list[str] = field(default_factory=list)   # how splits were made, e.g. a derived val split


@dataclass(frozen=True)
class SynthClip:
    """One clip of a synthetic raw tree: where, which class (index into the classes), how long."""

    video: Path
    label_index: int
    duration: float
    audio_path: Path | None = None


@dataclass(frozen=True)
class SynthLayout:
    """How a synthetic raw tree of a dataset is laid out. ``plan(out, clips, k, rng, duration,
    **options)`` writes the tree's text files (CSV, annotations) and returns the classes and
    the clips to encode; ``duration`` None means real lengths."""

    plan: Callable[..., tuple[list[str], list[SynthClip]]]
    default_classes: int
    max_classes: int
    max_clips_per_class: int | None = None


@dataclass(frozen=True)
class RemoteClip:
    """One clip ``avprep download`` fetches: its YouTube id, window (seconds; None when the list
    gives none) and where it goes in the raw layout (``path``, relative to the raw folder)."""

    key: str
    video_id: str
    start: float | None
    end: float | None
    label: str
    split: str              # train / val / test, or "all" when the list has no splits
    path: str


@dataclass
class DownloadPlan:
    """What a download list asks for: the clips, the layout's text files (written into the raw
    folder as given, e.g. vggsound.csv), and remarks."""

    clips: list[RemoteClip]
    files: dict[str, bytes] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Adapter:
    name: str                       # CLI name, e.g. "cremad"
    layout: str                     # one-line description of the raw layout (avprep datasets)
    num_classes: int | None         # fixed class count, None when derived from the data
    default_duration: float         # clip length of the paper's presets (3 s CREMA-D, 10 s others)
    discover: Callable[..., Discovery]
    synth: SynthLayout
    # ``download(lists, **options) -> DownloadPlan``: the clips of the datasets that come from
    # YouTube, laid out as ``discover`` reads them (None: not downloadable)
    download: Callable[..., DownloadPlan] | None = None


_KEY_BAD = re.compile(r"[.\s/\\]+")


def make_key(name: str) -> str:
    """A WebDataset-safe key: no dots (they start the extension), no whitespace or slashes, and
    valid UTF-8 (a name that is not UTF-8 on disk shows its bad bytes as ``xNN``)."""
    key = _KEY_BAD.sub("_", safe_text(name)).strip("_")
    return key or "clip"


def hash_fraction(name: str, seed: int = 0) -> float:
    """A stable number in [0, 1) from a clip (or speaker) name: adding clips never moves others."""
    # surrogateescape: a name that is not UTF-8 on disk hashes as its bytes (never a crash)
    digest = hashlib.sha256(f"{seed}:{name}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_split(name: str, seed: int = 0, test: float = 0.1, val_of_rest: float = 0.1) -> str:
    """README: Datasets: hold out ``test``, then split the rest ``1-val_of_rest : val_of_rest`` into train/val."""
    x = hash_fraction(name, seed)
    if x < test:
        return "test"
    return "val" if (x - test) / (1 - test) < val_of_rest else "train"


# ----------------------------------------------------------------------------- adapter helpers

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "dev": "val", "test": "test", "testing": "test"}
VAL_FRACTION = 0.1
# Never media: PyAV would open some (images, subtitles) but they are not audio-visual clips.
NOT_MEDIA = frozenset(
    ".txt .json .jsonl .csv .tsv .md .rst .html .htm .xml .yaml .yml .ini .cfg .log .py .sh .pdf "
    ".doc .docx .zip .tar .gz .tgz .bz2 .xz .7z .rar .db .sqlite .pkl .pickle .npy .npz .pt .pth "
    ".jpg .jpeg .png .bmp .webp .tif .tiff .srt .vtt .ass .ssa .sub .nfo .part .ytdl .tmp".split())


def split_alias(name: str) -> str | None:
    """``train``/``val``/``test`` for the usual spellings of a split name, else None."""
    return SPLIT_ALIASES.get(name.strip().lower())


def is_media_name(name: str) -> bool:
    """A plausible media file name: not hidden, has an extension, not an obvious non-media one."""
    i = name.rfind(".")             # Path(name).suffix, without building a Path (hot in discovery)
    suffix = name[i:].lower() if 0 < i < len(name) - 1 else ""
    return not name.startswith(".") and bool(suffix) and suffix not in NOT_MEDIA


def subdirs(folder: Path) -> list[Path]:
    """Sub-folders of ``folder`` sorted by name, without hidden (``.x``) and ``__x`` ones."""
    with os.scandir(folder) as entries:
        return sorted((Path(e.path) for e in entries
                       if e.is_dir() and not e.name.startswith((".", "__"))), key=lambda p: p.name)


def rel(path: Path, src: Path) -> str:
    """``path`` relative to the dataset root, POSIX style (what manifests and failures record)."""
    try:
        return Path(path).relative_to(src).as_posix()
    except ValueError:
        return Path(path).as_posix()


def derive_val(clips: list[Clip], seed: int = 0, fraction: float = VAL_FRACTION) -> list[Clip]:
    """Move a stable ``fraction`` of ``train`` (by hash of key and seed) to ``val``.

    For split sources with only train/test (VGGSound, OGM-GE lists): model selection needs a
    validation split, and hashing keeps it deterministic and stable as clips are added.
    """
    return [dataclasses.replace(c, split="val")
            if c.split == "train" and hash_fraction("val:" + c.key, seed) < fraction else c
            for c in clips]


def derived_val_note(source: str, seed: int, fraction: float = VAL_FRACTION) -> str:
    return (f"{source} has no validation split: val = {fraction:.0%} of train chosen by "
            f"hash of the key (seed {seed})")


def dedupe(clips, src: Path) -> tuple[list[Clip], list[Problem]]:
    """Keep the first clip of each key (callers order by priority); later ones become Problems."""
    kept: dict[str, Clip] = {}
    problems = []
    for clip in clips:
        first = kept.setdefault(clip.key, clip)
        if first is not clip:
            where = "listed twice" if first.split == clip.split else f"also in {first.split}"
            problems.append(Problem(clip.key, rel(clip.video, src), "duplicate",
                                    f"duplicate key in {clip.split} ({where}); kept {rel(first.video, src)}"))
    return list(kept.values()), problems


def finish(name: str, classes: list[str], clips: list[Clip], problems: list[Problem],
           skipped: dict[str, int], duration: float, notes: Sequence[str] = ()) -> Discovery:
    """A Discovery with clips sorted by key and problems by (key, stage): reruns compare equal.

    Every text it carries is made valid UTF-8 here (``safe_text``), once for all adapters: a
    label, class, meta value or message built from a name that is not UTF-8 on disk (a CSV read
    with surrogateescape, a folder name) would otherwise stop the first JSON file written."""
    clips = [dataclasses.replace(c, label=safe_text(c.label), meta=_safe_values(c.meta)) for c in clips]
    problems = [Problem(safe_text(p.key), safe_text(p.source), p.stage, safe_text(p.error)) for p in problems]
    return Discovery(name=name, classes=[safe_text(c) for c in classes], clips=sorted(clips, key=lambda c: c.key),
                     problems=sorted(problems, key=lambda p: (p.key, p.stage, p.source)),
                     skipped={safe_text(k): v for k, v in sorted(skipped.items()) if v},
                     default_duration=duration, notes=[safe_text(n) for n in notes])


def _safe_values(value):
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, dict):
        return {safe_text(str(k)): _safe_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_safe_values(v) for v in value)
    return value


def safe_text(text: str) -> str:
    """``text`` as valid UTF-8: a file name that is not UTF-8 on disk (Python holds its bad
    bytes as lone surrogates) shows them as ``\\xNN``, so records and messages can be written."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return text.encode("utf-8", "backslashreplace").decode("utf-8")


# ----------------------------------------------------------------------------- synthetic layouts

YT_ALPHABET = string.ascii_letters + string.digits + "-_"


def synth_youtube_id(rng: np.random.Generator) -> str:
    return "".join(YT_ALPHABET[i] for i in rng.integers(0, len(YT_ALPHABET), 11))


def synth_split(rng: np.random.Generator, splits=("train", "val", "test"), p=(0.8, 0.1, 0.1)) -> str:
    return str(splits[int(rng.choice(len(splits), p=p))])


def synth_labels(clips: int, k: int, rng: np.random.Generator) -> list[int]:
    """Balanced labels (round robin), shuffled."""
    labels = [i % k for i in range(clips)]
    rng.shuffle(labels)
    return labels
