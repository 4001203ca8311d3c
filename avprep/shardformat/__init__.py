"""The shard format (README: Output), owned here and nowhere else.

Everything that names, orders, parses or describes what ``avprep extract`` writes lives in this
package, one module per reason to change:

- ``names``: the files of an output folder, member names and their order, the key/extension rule,
  the frame pattern, the refused (pickle) extensions, the readers' size limits;
- ``tar``: the one streaming tar reader (``TarReader``), which never trusts a shard;
- ``samples``: samples grouped by key with their byte span and CRC-32, and the safe ``.npy`` /
  ``.cls`` / JPEG decoders of their members;
- ``sidefiles``: the typed files next to the shards (``dataset.json``, ``<split>.manifest.json``,
  the sample index ``<split>.samples.jsonl``, ``<split>.wids.json``);
- ``dataset``: ``open_dataset``, the one entry point that opens a dataset through those readers;
- ``card``: the Hugging Face dataset card ``README.md``;
- ``segments``: the per-second segment labels of a sample's json (AVE event localisation).

The writer (``shards.py``/``outdir.py``), ``verify``, the training loader and ``avprep info``/
``index`` all go through it, so they accept and refuse exactly the same shards. Every name is
importable from here (``from avprep import shardformat as sf``; ``sf.open_dataset``, ``sf.SPEC``).
"""
from __future__ import annotations

from .card import dataset_card, write_card
from .dataset import Dataset, open_dataset
from .errors import ShardDataError
from .names import (
    CARD,
    CLS,
    CORE_MEMBERS,
    DATASET,
    FAILURES,
    FRAME,
    INDEX_SUFFIX,
    JSON,
    MANIFEST_SUFFIX,
    MAX_EXT_BYTES,
    MAX_EXT_HEADERS,
    MAX_MEMBER,
    MAX_PIXELS,
    MAX_SAMPLE,
    REFUSED_EXTS,
    SHARD_NAME,
    SHARD_SUFFIX,
    SPEC,
    SPLIT_FILE_SUFFIXES,
    TMP_MARK,
    WIDS_SUFFIX,
    frame_name,
    index_name,
    is_output_file,
    is_refused,
    manifest_name,
    ordered_members,
    shard_name,
    split_name,
    split_order,
    unsafe_name,
    wids_name,
)
from .samples import (
    RawSample,
    check_structure,
    member_problem,
    npy_header,
    open_jpeg,
    parse_cls,
    parse_sample_bytes,
    parse_spec,
    read_shard_samples,
)
from .segments import BACKGROUND, SEGMENTS, count_segments, parse_segments, segment_labels
from .sidefiles import (
    INDEX_FIELDS,
    DatasetMeta,
    IndexEntry,
    Manifest,
    SampleIndex,
    ShardEntry,
    check_shard_name,
    dump_json,
    frame_stats,
    index_records,
    load_json,
    wids_index,
    write_split_files,
)
from .tar import Member, TarReader

__all__ = [
    "CARD", "CLS", "CORE_MEMBERS", "DATASET", "FAILURES", "FRAME", "INDEX_FIELDS", "INDEX_SUFFIX", "JSON",
    "MANIFEST_SUFFIX", "MAX_EXT_BYTES", "MAX_EXT_HEADERS", "MAX_MEMBER", "MAX_PIXELS", "MAX_SAMPLE", "REFUSED_EXTS",
    "BACKGROUND", "SEGMENTS", "SHARD_NAME", "SHARD_SUFFIX", "SPEC", "SPLIT_FILE_SUFFIXES", "TMP_MARK", "WIDS_SUFFIX",
    "Dataset", "DatasetMeta", "IndexEntry", "Manifest", "Member", "RawSample", "SampleIndex", "ShardDataError",
    "ShardEntry", "TarReader",
    "check_shard_name", "check_structure", "dataset_card", "dump_json", "frame_name", "frame_stats", "index_name",
    "index_records", "is_output_file", "is_refused", "load_json", "manifest_name", "member_problem", "npy_header",
    "open_dataset", "open_jpeg", "ordered_members", "parse_cls", "parse_sample_bytes", "parse_spec",
    "count_segments", "parse_segments", "read_shard_samples", "segment_labels",
    "shard_name", "split_name", "split_order", "unsafe_name", "wids_index", "wids_name",
    "write_card", "write_split_files",
]
