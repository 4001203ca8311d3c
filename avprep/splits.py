"""The registry of published splits and class lists (README: Getting the corpora), the one
reader of ``manifests/splits.json``.

A result is only comparable to another if both name the exact split and class list they used:
Kinetics-Sounds appears with 31 to 34 classes, VGGSound's csv has 291 rows more than its split
lists, CREMA-D is split three ways. Each published list is an ``Entry`` ``<dataset>/<name>@<version>``
with its source (repository, commit, path), counts per split and hashes:

- ``sha256`` / ``git_blob`` of each file as published (the git blob id is what a repository
  records for a file we could not read; ``git hash-object FILE`` gives it for a local copy);
- ``content_sha256``: sha256 of the sorted lines ``<split>\\t<clip id>\\t<label>\\n`` the files
  hold (clip ids without a media suffix, labels as class names), so a copy with other line
  ends, a header or another row order still matches;
- for class lists, ``classes_sha256``: sha256 of the names in label order, one per line.

We do not ship the split files: users pass their copies (``--split-file``), which ``check``
compares with the entry. Kinds: ``split`` (files), ``rule`` (a split avprep derives, e.g.
CREMA-D by speaker hash; its counts are over the full dataset) and ``classes``.

``identify`` names the entry an extraction's split files (or the dataset's own list files:
VGGSound's csv, AVE's set files) match; ``extract`` records it in dataset.json and the trainer
copies it into each run's summary.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from manifests import load as _load_manifest

from .errors import ConfigError, DatasetLayoutError

_MEDIA_SUFFIX = re.compile(r"\.(mp4|mkv|webm|avi|flv|mov|wav)$", re.IGNORECASE)
KINDS = ("split", "rule", "classes")
FORMATS = ("lists", "vggsound-csv", "ave-sets")


@dataclass(frozen=True)
class PublishedFile:
    """One file of a published split, as its source holds it."""

    split: str | None           # None: the file holds several splits (a JSON, VGGSound's csv)
    name: str                   # the name users pass (e.g. train.csv)
    path: str                   # path in the source repository
    sha256: str | None = None   # None: not known (the file was not readable from here)
    git_blob: str | None = None
    rows: int | None = None


@dataclass(frozen=True)
class Entry:
    name: str                                   # "<dataset>/<name>", e.g. "kinetics-sounds/ogmge"
    version: int
    dataset: str
    kind: str                                   # "split", "rule" or "classes"
    title: str
    source: dict                                # repo, commit, url, paper, issue: whatever is known
    counts: dict[str, int] = field(default_factory=dict)   # split -> rows (classes: {"classes": n})
    content_sha256: str | None = None
    files: tuple[PublishedFile, ...] = ()
    classes: str | None = None                  # the class-list entry (id) a split's labels index
    class_names: tuple[str, ...] | None = None  # kind "classes": the names, when known
    classes_sha256: str | None = None
    format: str | None = None                   # how the files are read (FORMATS)
    overlap: int = 0                            # clip ids the published files put in two splits
    rule: dict | None = None                    # kind "rule": {"split_by": ..., "seed": ...}
    notes: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def hash(self) -> str | None:
        """The hash that identifies this entry (content for splits, names for class lists)."""
        return self.classes_sha256 if self.kind == "classes" else self.content_sha256

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        d = {"id": self.id, "name": self.name, "version": self.version, "dataset": self.dataset,
             "kind": self.kind, "title": self.title, "source": dict(self.source), "counts": dict(self.counts),
             "content_sha256": self.content_sha256, "classes": self.classes,
             "classes_sha256": self.classes_sha256, "format": self.format, "overlap": self.overlap,
             "rule": self.rule, "notes": list(self.notes),
             "files": [vars(f).copy() for f in self.files]}
        if self.class_names is not None:
            d["class_names"] = list(self.class_names)
        return d


# ----------------------------------------------------------------------------- the registry

@lru_cache(maxsize=1)
def entries() -> tuple[Entry, ...]:
    """Every entry of manifests/splits.json, in its order (checked on load)."""
    doc = _load_manifest("splits")
    out = []
    for raw in doc["entries"]:
        raw = dict(raw)
        files = tuple(PublishedFile(**f) for f in raw.pop("files", ()))
        names = raw.pop("class_names", None)
        if raw.pop("class_manifest", None) is not None:      # names shipped in manifests/<dataset>.json
            names = _load_manifest(raw["dataset"])["classes"]
        entry = Entry(files=files, class_names=None if names is None else tuple(names),
                      notes=tuple(raw.pop("notes", ())), **raw)
        if entry.kind not in KINDS or (entry.format is not None and entry.format not in FORMATS):
            raise ValueError(f"manifests/splits.json: {entry.id}: bad kind or format")
        if entry.class_names is not None and classes_hash(entry.class_names) != entry.classes_sha256:
            raise ValueError(f"manifests/splits.json: {entry.id}: classes_sha256 does not match its names")
        out.append(entry)
    ids = [e.id for e in out]
    if len(set(ids)) != len(ids):
        raise ValueError("manifests/splits.json: duplicate entry ids")
    return tuple(out)


def get(name: str) -> Entry:
    """The entry ``name`` (``<dataset>/<name>`` for its newest version, or ``...@<version>``)."""
    base, _, version = str(name).strip().partition("@")
    found = [e for e in entries() if e.name == base and (not version or str(e.version) == version)]
    if not found:
        known = ", ".join(e.id for e in entries())
        raise ConfigError(f"unknown split registry entry {name!r}; known: {known}")
    return max(found, key=lambda e: e.version)


def for_dataset(dataset: str) -> list[Entry]:
    return [e for e in entries() if e.dataset == dataset]


def class_list(entry: Entry) -> Entry | None:
    """The class-list entry of ``entry`` (itself for a class list)."""
    if entry.kind == "classes":
        return entry
    return get(entry.classes) if entry.classes else None


# ----------------------------------------------------------------------------- hashes

def content_hash(rows) -> str:
    """sha256 of the sorted ``<split>\\t<clip>\\t<label>\\n`` lines of ``rows`` (duplicates kept)."""
    lines = sorted(f"{split}\t{clip}\t{label}\n" for split, clip, label in rows)
    return hashlib.sha256("".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


def classes_hash(classes) -> str:
    """sha256 of the class names in label order, one per line."""
    return hashlib.sha256("".join(f"{c}\n" for c in classes).encode("utf-8")).hexdigest()


def file_hashes(path) -> tuple[str, str]:
    """(sha256, git blob id) of a file's bytes."""
    data = Path(path).read_bytes()
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return hashlib.sha256(data).hexdigest(), blob


def canonical_clip(clip: str) -> str:
    return _MEDIA_SUFFIX.sub("", clip.strip())


# ----------------------------------------------------------------------------- reading files

@dataclass
class Rows:
    """The (split, clip, label) rows of some split files, and what could not be read as rows."""

    rows: list[tuple[str, str, str]]
    rejected: int = 0                   # rows whose label is not a class (headers included)
    files: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Rows per split, train / val / test first."""
        c = Counter(split for split, _, _ in self.rows)
        order = {s: i for i, s in enumerate(("train", "val", "test"))}
        return {s: c[s] for s in sorted(c, key=lambda s: (order.get(s, 3), s))}

    def overlap(self) -> set[str]:
        """Clip ids listed in more than one split."""
        splits: dict[str, set[str]] = {}
        for split, clip, _ in self.rows:
            splits.setdefault(clip, set()).add(split)
        return {clip for clip, s in splits.items() if len(s) > 1}


def read_rows(fmt: str, split_files, classes: list[str] | None = None) -> Rows:
    """The rows of ``split_files`` (``splitfiles`` spellings: paths, ``SPLIT=PATH``, pairs)
    read as format ``fmt``."""
    from .datasets import ave, splitfiles, vggsound

    pairs = splitfiles.normalize(split_files)
    if fmt == "lists":
        source = splitfiles.read_split_files(pairs, classes)
        rows = [(e.split, canonical_clip(e.clip_id), e.label) for e in source.entries]
        return Rows(rows, len(source.problems), source.files)
    out = Rows([])
    for split, path in pairs:
        if not Path(path).is_file():
            raise DatasetLayoutError(f"{path}: split file not found")
        if fmt == "vggsound-csv":
            out.rows += [(s, f"{ytid}_{start:06d}", label) for _, ytid, start, label, s in vggsound.read_csv(path)]
        elif fmt == "ave-sets":
            split = split or splitfiles.infer_split(path)
            if split is None:
                raise ConfigError(f"{path}: cannot tell the split from the file name; pass it as SPLIT=PATH")
            out.rows += [(split, vid, cat) for _, cat, vid, *_ in ave.read_annotations(Path(path))]
        else:
            raise ConfigError(f"unknown split file format {fmt!r}")
        out.files.append(str(path))
    return out


# ----------------------------------------------------------------------------- check

@dataclass
class CheckReport:
    entry: str
    problems: list[str] = field(default_factory=list)   # each fails the check
    facts: list[str] = field(default_factory=list)      # what was checked and held
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"entry": self.entry, "ok": self.ok, "problems": list(self.problems), "facts": list(self.facts),
                "counts": dict(self.counts)}


def check(entry: Entry, split_files=(), classes: list[str] | None = None,
          keys_by_split: dict[str, set[str]] | None = None) -> CheckReport:
    """Compare the user's ``split_files`` with ``entry`` (file hashes, content hash, counts,
    overlap between splits), a run's ``classes`` with the entry's class list, and a run's
    ``keys_by_split`` (an extraction's sample keys) for keys in more than one split."""
    report = CheckReport(entry.id)
    listing = class_list(entry)
    names = list(listing.class_names) if listing is not None and listing.class_names is not None else None
    if split_files:
        if entry.kind == "classes":
            raise ConfigError(f"{entry.id} is a class list; pass a split entry to check split files")
        _check_files(entry, split_files, names, report)
    if classes is not None:
        _check_classes(listing, list(classes), report)
    if keys_by_split is not None:
        _check_keys(keys_by_split, report)
    if not (split_files or classes is not None or keys_by_split is not None):
        raise ConfigError("nothing to check: pass split files, or an extraction to compare with the entry")
    return report


def _check_files(entry: Entry, split_files, names, report: CheckReport) -> None:
    from .datasets import splitfiles

    pairs = splitfiles.normalize(split_files)
    matched = []
    for _, path in pairs:
        if not Path(path).is_file():
            raise DatasetLayoutError(f"{path}: split file not found")
        sha, blob = file_hashes(path)
        same = next((f for f in entry.files if sha == f.sha256 or blob == f.git_blob), None)
        if same is not None:
            matched.append(path)
            report.facts.append(f"{Path(path).name}: identical to {same.path} of {entry.id}")
    if entry.format is None:
        report.problems.append(f"{entry.id} has no files to compare with")
        return
    rows = read_rows(entry.format, pairs, names)
    report.counts = rows.counts()
    if rows.rejected:
        report.facts.append(f"{rows.rejected} row(s) without a label of the class list were not counted "
                            f"(a header line is one)")
    if entry.content_sha256 is not None:
        digest = content_hash(rows.rows)
        if digest == entry.content_sha256:
            report.facts.append(f"content hash {digest[:12]} matches {entry.id}")
        else:
            report.problems.append(f"content hash {digest[:12]} differs from {entry.id}'s "
                                   f"{entry.content_sha256[:12]}: not the published rows")
    elif len(matched) < len(pairs):
        known = [f for f in entry.files if f.sha256 or f.git_blob]
        if known:
            report.problems.append(f"hash mismatch: {len(pairs) - len(matched)} file(s) match none of "
                                   f"{entry.id}'s published files")
        else:
            report.facts.append(f"{entry.id}'s hashes are unknown: only counts were checked")
    _check_counts(entry, report)
    shared = rows.overlap()
    if len(shared) > entry.overlap:
        report.problems.append(f"{len(shared):,} clip id(s) in more than one split (e.g. {sorted(shared)[0]})"
                               + (f"; {entry.id} has {entry.overlap}" if entry.overlap else ""))
    elif shared:
        report.facts.append(f"{len(shared)} clip id(s) in two splits, as published ({entry.id} records them)")


def _check_counts(entry: Entry, report: CheckReport) -> None:
    """The files' rows per split (``report.counts``) against the entry's counts."""
    counted = ", ".join(f"{s} {n:,}" for s, n in report.counts.items())
    if not entry.counts:
        report.facts.append(f"{entry.id}'s counts are unknown; the files have {counted}")
    elif entry.counts == report.counts:
        report.facts.append(f"counts {counted} match")
    for split in sorted(set(entry.counts) | set(report.counts)) if entry.counts else ():
        want, got = entry.counts.get(split), report.counts.get(split, 0)
        if want is None:
            report.problems.append(f"{split}: {got:,} rows, but {entry.id} has no {split} split")
        elif want != got:
            report.problems.append(f"{split}: {got:,} rows, {entry.id} has {want:,}")


def _check_classes(listing: Entry | None, classes: list[str], report: CheckReport) -> None:
    if listing is None:
        report.problems.append(f"{report.entry} names no class list to compare with")
        return
    if listing.classes_sha256 is None:
        count = listing.counts.get("classes")
        if count is not None and count != len(classes):
            report.problems.append(f"the run has {len(classes)} classes, {listing.id} has {count}")
        else:
            report.facts.append(f"{listing.id}'s names are unknown: only the count ({len(classes)}) was checked")
        return
    digest = classes_hash(classes)
    if digest == listing.classes_sha256:
        report.facts.append(f"the run's {len(classes)} classes are {listing.id} (same names, same order)")
        return
    why = f"{len(classes)} classes, {listing.id} has {listing.counts.get('classes')}"
    if listing.class_names is not None:
        mine, theirs = set(classes), set(listing.class_names)
        if mine == theirs:
            why = "same names in another order (label indices differ)"
        else:
            extra, missing = sorted(mine - theirs), sorted(theirs - mine)
            parts = ([f"not in it: {', '.join(extra[:3])}"] if extra else []) + \
                ([f"missing: {', '.join(missing[:3])}"] if missing else [])
            why = ", ".join(parts)
    report.problems.append(f"the run's class list differs from {listing.id}: {why}")


def _check_keys(keys_by_split: dict[str, set[str]], report: CheckReport) -> None:
    seen: dict[str, str] = {}
    shared = []
    for split, keys in keys_by_split.items():
        for key in keys:
            if seen.setdefault(key, split) != split:
                shared.append(key)
    if shared:
        report.problems.append(f"{len(shared):,} sample key(s) in more than one split of the extraction "
                               f"(e.g. {sorted(shared)[0]})")
    else:
        report.facts.append("no sample key is in two splits of the extraction")


# ----------------------------------------------------------------------------- identify

@dataclass(frozen=True)
class Match:
    entry: Entry
    how: str            # "file" (published bytes), "content" (same rows) or "rule"

    def record(self) -> dict:
        """What dataset.json and run summaries record."""
        return {"id": self.entry.id, "title": self.entry.title, "match": self.how}


def identify(dataset: str, split_files=(), *, src=None, split_by: str | None = None, seed: int = 0) -> Match | None:
    """The entry an extraction of ``dataset`` uses: its split files (or the dataset's own list
    files in ``src``) by file hash, then by content; avprep's rule splits by options."""
    from .datasets import ave, splitfiles, vggsound

    candidates = [e for e in for_dataset(dataset) if e.kind != "classes"]
    pairs = splitfiles.normalize(split_files)
    if not pairs and src is not None:
        if dataset == "vggsound" and (Path(src) / vggsound.CSV).is_file():
            pairs = [(None, Path(src) / vggsound.CSV)]
        elif dataset == "ave" and Path(src).is_dir():
            pairs = sorted(ave.set_files(Path(src)).items())
    if not pairs:
        rule = {"split_by": split_by or "clip", "seed": seed}
        return next((Match(e, "rule") for e in candidates if e.kind == "rule" and e.rule == rule), None)
    hashes = [file_hashes(p) for _, p in pairs if Path(p).is_file()]
    for e in candidates:
        published = {f.sha256 for f in e.files} | {f.git_blob for f in e.files}
        if e.files and len(hashes) == len(e.files) and all(s in published or b in published for s, b in hashes):
            return Match(e, "file")
    for e in candidates:
        if e.content_sha256 is None or e.format is None:
            continue
        listing = class_list(e)
        names = list(listing.class_names) if listing and listing.class_names is not None else None
        try:
            rows = read_rows(e.format, pairs, names)
        except (ConfigError, DatasetLayoutError):
            continue
        if content_hash(rows.rows) == e.content_sha256:
            return Match(e, "content")
    return None


def resolve(dataset: str, requested: str | None, split_files=(), *, src=None, split_by=None,
            seed: int = 0) -> Match | None:
    """``identify``, and with ``requested`` (an entry name) a ConfigError unless the
    extraction's splits are that entry's."""
    found = identify(dataset, split_files, src=src, split_by=split_by, seed=seed)
    if requested is None:
        return found
    want = get(requested)
    if want.dataset != dataset:
        raise ConfigError(f"--splits {want.id} is a {want.dataset} entry, not {dataset}")
    if want.kind == "classes":
        raise ConfigError(f"--splits {want.id} is a class list, not a split")
    if found is None or found.entry.name != want.name or found.entry.version != want.version:
        what = "the split files given" if split_files else "the dataset's own splits"
        if want.kind == "split" and not split_files and want.format == "lists":
            hint = f"; pass its files with --split-file ({', '.join(f.name for f in want.files)})"
        else:
            hint = f" (they are {found.entry.id})" if found else ""
        raise ConfigError(f"--splits {want.id}: {what} do not match it{hint}")
    return found
