"""The names of the shard format: the files of an output folder, the members of a sample and
their order, the key rule, the refused (pickle) extensions, and the size limits readers keep.

Nothing outside ``avprep.shardformat`` spells one of these names (a test checks the sources)."""
from __future__ import annotations

import re
from collections.abc import Iterable

from ..datasets._base import SPLITS

# The files of an output folder. dataset.json is written last: it marks a complete output.
DATASET = "dataset.json"
CARD = "README.md"                      # the Hugging Face dataset card
FAILURES = "failures.jsonl"             # one line per clip that failed (written by outdir)
SHARD_SUFFIX = ".tar"                   # <split>-NNNNNN.tar
INDEX_SUFFIX = ".samples.jsonl"         # <split>.samples.jsonl, the sample index
WIDS_SUFFIX = ".wids.json"              # <split>.wids.json
MANIFEST_SUFFIX = ".manifest.json"      # <split>.manifest.json
SPLIT_FILE_SUFFIXES = (INDEX_SUFFIX, WIDS_SUFFIX, MANIFEST_SUFFIX)     # a split's side files, in writing order
# The members of a sample: <key>.cls, <key>.json, <key>.spec.npy, then <key>.f000.jpg, ...
CLS, JSON, SPEC = "cls", "json", "spec.npy"
CORE_MEMBERS = (CLS, JSON, SPEC)        # in tar order, then the frames
FRAME = re.compile(r"f(\d{3,})\.jpg")
# Members whose only use is to be unpickled (compared case-insensitively on the last extension).
REFUSED_EXTS = frozenset({"pyd", "pickle", "pkl", "pt", "pth", "ckpt"})
SHARD_NAME = re.compile(r"[A-Za-z0-9_]+(?:-[A-Za-z0-9_]+)*-\d{6}\.tar")
TMP_MARK = ".tmp-"
MAX_MEMBER = 256 * 2**20        # bigger than any real member: bounds memory per read
MAX_SAMPLE = 2 * MAX_MEMBER     # an index entry claiming more is refused before anything is read
MAX_PIXELS = 64 * 2**20         # a frame larger than this is an attack (or not ours): never decoded
MAX_EXT_HEADERS = 8             # pax/GNU long-name headers allowed before one member
MAX_EXT_BYTES = 1 << 20


def frame_name(i: int) -> str:
    return f"f{i:03d}.jpg"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}{SHARD_SUFFIX}"


def index_name(split: str) -> str:
    return split + INDEX_SUFFIX


def manifest_name(split: str) -> str:
    return split + MANIFEST_SUFFIX


def wids_name(split: str) -> str:
    return split + WIDS_SUFFIX


def is_output_file(name: str) -> bool:
    """A file ``avprep extract`` writes into an output folder (or a temporary one of a writer)."""
    return (name in (DATASET, FAILURES, CARD) or name.endswith((SHARD_SUFFIX, *SPLIT_FILE_SUFFIXES))
            or TMP_MARK in name)


def split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key ends at the first dot of the file name; ("", "") when the
    name has no extension (not a sample member)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return "", ""
    return (f"{head}/{stem}" if head else stem), ext


def is_refused(ext: str) -> bool:
    """A pickle-like member (``.pkl``, ``.PKL``, ``.ckpt``, ``x.pth`` ...): never read."""
    return ext.rpartition(".")[2].lower() in REFUSED_EXTS


def unsafe_name(name: str) -> bool:
    return (not name or name.startswith("/") or ".." in name.split("/") or "\\" in name
            or "\0" in name)


def ordered_members(cls: bytes, meta: bytes, spec: bytes, frames: list[bytes]) -> dict[str, bytes]:
    """The members of one sample, without the key prefix, in tar order."""
    out = {CLS: cls, JSON: meta, SPEC: spec}
    for i, jpeg in enumerate(frames):
        out[frame_name(i)] = jpeg
    return out


def split_order(splits: Iterable[str]) -> list[str]:
    """train, val, test first, then any other split names alphabetically."""
    splits = set(splits)
    return [s for s in SPLITS if s in splits] + sorted(splits - set(SPLITS))
