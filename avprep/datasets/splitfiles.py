"""Readers of the published split files (README: Datasets), so published experiments can be reproduced.

Formats (detected from the content, not the name):

- OGM-GE CREMA-D CSV, one file per split: lines ``<clip>,<EMO>``
  (any ``<clip>,<label name>`` file reads the same way);
- OGM-GE Kinetics-Sounds lists, one file per split: lines ``<clip_id>,10,<label_index>``,
  the index into the dataset's class list (the middle field is ignored);
- TPAMI-2024 Kinetics-Sounds JSON: ``{"labels": [...], "database": {clip_id:
  {"subset": "training|validation|testing", "label": name}}}``, all splits in one file.

``split_files`` is a sequence of ``(split, path)`` pairs, ``"split=path"`` strings or plain
paths. A plain text file's split comes from its name (it must contain exactly one of
train / val|valid / test); a JSON file's come from its subsets (an explicit split keeps only
that subset). Real copies use Windows line ends, which are accepted, as are blank lines and
trailing whitespace.

Clip ids: the OGM-GE KS train list and the TPAMI training subset name clips by their Kinetics
file stem ``<youtube_id>_<start:06d>_<end:06d>``, but the OGM-GE test list and the TPAMI
validation/testing subsets use ``<youtube_id>_<start>`` (start second, unpadded: ``-3Mwkq-7TV4_2``
is the clip starting at 2 s of YouTube video ``-3Mwkq-7TV4``). YouTube ids are always 11
characters, which makes the split of an id into video, start and end unambiguous even though
ids themselves contain ``_`` and ``-``; see :func:`parse_clip_id`. Adapters match such ids on
(youtube id, start), then on the youtube id alone when the suffix is a single number and the
tree holds exactly one file of that video.

Published CREMA-D and KS lists only have train and test: adapters then derive ``val`` from
train by hash (``_base.derive_val``) and record that in ``Discovery.notes``.
"""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DatasetLayoutError
from ._base import SPLITS, Problem, make_key, split_alias

_YT_CLIP = re.compile(r"([A-Za-z0-9_-]{11})(?:_(\d+))?(?:_(\d+))?")
_NAME_SPLIT = re.compile(r"train|val|test", re.IGNORECASE)


@dataclass(frozen=True)
class SplitEntry:
    """One listed clip: its id as written, its split and label, and where it was listed."""

    clip_id: str
    split: str
    label: str
    source: str        # "<file name>:<line>" (or ":<clip id>" for JSON)


@dataclass
class SplitSource:
    entries: list[SplitEntry] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)    # rows whose label is not a class
    splits: set[str] = field(default_factory=set)             # splits the files define
    files: list[str] = field(default_factory=list)

    @property
    def needs_val(self) -> bool:
        """Only train/test given: the caller derives val from train."""
        return "train" in self.splits and "val" not in self.splits


def parse_clip_id(clip_id: str) -> tuple[str, int | None, int | None] | None:
    """``(youtube_id, start, end)`` of a Kinetics/VGGSound style id or file stem, else None.

    ``abc-_defGHI_000058_000068`` -> (``abc-_defGHI``, 58, 68); ``abc-_defGHI_2`` -> (..., 2, None);
    ``abc-_defGHI`` -> (..., None, None). Relies on YouTube ids having 11 characters.
    """
    m = _YT_CLIP.fullmatch(clip_id)
    if not m:
        return None
    yt, start, end = m.groups()
    return yt, None if start is None else int(start), None if end is None else int(end)


def infer_split(path: Path) -> str | None:
    """The split a file name announces (``cremad_ogmge_train.csv`` -> train), None if not exactly one."""
    found = {split_alias(m.group(0)) for m in _NAME_SPLIT.finditer(Path(path).name)}
    return found.pop() if len(found) == 1 else None


def normalize(split_files) -> list[tuple[str | None, Path]]:
    """``(split or None, path)`` pairs from the accepted spellings; unknown split names are a ConfigError."""
    if isinstance(split_files, (str, Path)):
        split_files = [split_files]
    out = []
    for item in split_files or ():
        if isinstance(item, (tuple, list)):
            name, path = item
        else:
            name, path = None, str(item)
            head, eq, tail = path.partition("=")
            if eq and split_alias(head):
                name, path = head, tail
        if name is not None:
            split = split_alias(str(name))
            if split is None:
                raise ConfigError(f"unknown split {name!r} for split file {path}; use one of {', '.join(SPLITS)}")
            name = split
        out.append((name, Path(path)))
    return out


def read_split_files(split_files, classes: list[str] | None) -> SplitSource:
    """All entries of ``split_files`` in file order, labels resolved against ``classes``.

    Rows with a label outside ``classes`` become Problems (stage "label"); a file none of whose
    rows has a valid label is the wrong file for this dataset and raises DatasetLayoutError,
    as does an unreadable or ill-formed file (the message names the file and line).
    ``classes=None`` keeps every label as written (lists that name labels by index are then
    refused: they need the class list).
    """
    source = SplitSource()
    for split, path in normalize(split_files):
        if not path.is_file():
            raise DatasetLayoutError(f"{path}: split file not found")
        try:
            text = path.read_text(encoding="utf-8-sig", errors="surrogateescape")
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetLayoutError(f"{path}: cannot read split file ({e})") from None
        if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
            rows = _json_rows(path, text, split)
        else:
            split = split or infer_split(path)
            if split is None:
                raise ConfigError(f"{path}: cannot tell the split from the file name; "
                                  f"pass it as train=PATH, val=PATH or test=PATH")
            rows = [(clip, split, label, where) for clip, label, where in _text_rows(path, text, classes)]
        good = 0
        for clip, row_split, label, where in rows:
            source.splits.add(row_split)
            if classes is None or label in classes:
                good += 1
                source.entries.append(SplitEntry(clip, row_split, label, where))
            else:
                source.problems.append(Problem(make_key(clip), where, "label",
                                               f"label {label!r} is not one of the {len(classes or ())} classes"))
        if rows and not good:
            raise DatasetLayoutError(f"{path}: none of its {len(rows)} rows has a label of this dataset "
                                     f"(wrong split file?)")
        source.files.append(str(path))
    return source


def _text_rows(path: Path, text: str, classes: list[str] | None):
    """(clip, label, where) of a CSV/TXT list; ``<id>,<n>,<index>`` rows are mapped to class names."""
    for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
        row = [f.strip() for f in row]
        if not any(row):
            continue
        if len(row) == 2 and row[0]:
            yield row[0], row[1], f"{path.name}:{n}"
        elif len(row) == 3 and row[0] and row[1].isdigit() and row[2].isdigit():
            if classes is None:
                raise ConfigError(f"{path}:{n}: this list names labels by index; it needs the class list")
            index = int(row[2])
            label = classes[index] if index < len(classes) else f"index {index}"
            yield row[0], label, f"{path.name}:{n}"
        else:
            raise DatasetLayoutError(f"{path}:{n}: expected '<clip>,<label>' or '<clip_id>,10,<label_index>', "
                                     f"got {','.join(row)!r}")


def _json_rows(path: Path, text: str, only: str | None):
    """(clip, split, label, where) of a TPAMI-style JSON, optionally only the subset ``only``."""
    try:
        doc = json.loads(text)
        database = doc["database"]
        rows = []
        for clip, info in database.items():
            split = split_alias(str(info["subset"]))
            if split is None:
                raise DatasetLayoutError(f"{path}: clip {clip!r} has unknown subset {info['subset']!r}")
            if only is None or split == only:
                rows.append((clip, split, str(info["label"]), f"{path.name}:{clip}"))
        return rows
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DatasetLayoutError(f"{path}: not a split JSON with a 'database' of "
                                 f"{{clip: {{subset, label}}}} ({type(e).__name__}: {e})") from None
