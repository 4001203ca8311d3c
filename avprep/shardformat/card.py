"""``README.md``: the Hugging Face dataset card of an output folder."""
from __future__ import annotations

import json
from pathlib import Path

from .names import CARD, CLS, INDEX_SUFFIX, JSON, SPEC, WIDS_SUFFIX, frame_name
from .samples import read_shard_samples
from .sidefiles import DatasetMeta, Manifest

# Hugging Face's split names where ours differ: ``datasets`` users (and its own builders) call the
# held-out split "validation". The card maps it; file names keep ours (val-000000.tar, ...).
HF_SPLITS = {"val": "validation"}


def hf_split(split: str) -> str:
    """The name of ``split`` in the dataset card (and so in ``datasets.load_dataset(OUT)``)."""
    return HF_SPLITS.get(split, split)


def _hf_type(value) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64"
    if isinstance(value, float):
        return "float64"
    if isinstance(value, str):
        return "string"
    return None


def _hf_json_struct(example: dict) -> list[str]:
    """YAML lines of a ``struct`` feature for a sample's ``json`` (scalars and flat lists)."""
    lines = []
    for k in sorted(example):
        v = example[k]
        if isinstance(v, list):
            kinds = {_hf_type(x) for x in v} or {"float64"}
            kinds = {"float64"} if kinds == {"int64", "float64"} else kinds
            if len(kinds) == 1 and None not in kinds:
                lines += [f"    - name: {json.dumps(k)}", f"      sequence: {kinds.pop()}"]
        elif _hf_type(v):
            lines += [f"    - name: {json.dumps(k)}", f"      dtype: {_hf_type(v)}"]
    return lines


def dataset_card(meta: DatasetMeta, manifests: dict[str, Manifest], example: dict | None = None) -> bytes:
    """``README.md``, a Hugging Face dataset card. One config whose ``data_files`` list each split's
    shards (so the side files are never taken for data), under Hugging Face's split names
    (``hf_split``: ``val`` is ``validation``), and the features, so ``datasets`` needs no
    inference: ``cls`` a ``ClassLabel`` with the class names, ``json`` a struct (its fields from
    ``example``, one sample's metadata), ``spec.npy`` an ``Array2D`` of the spectrogram's shape and
    dtype (``datasets`` decodes ``.npy`` without pickle), and frames ``f000.jpg`` .. up to
    ``max_frames`` as ``Image``: a sample with fewer frames has None in the others, which is how
    ``datasets`` fills members a sample lacks once the features are given (inferring them fails
    on varying frame counts)."""
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split, m in manifests.items():
        lines += [f"  - split: {hf_split(split)}", "    path:"] + [f"    - {s.name}" for s in m.shards]
    lines += ["dataset_info:", "  features:", f"  - name: {CLS}", "    dtype:", "      class_label:", "        names:"]
    lines += [f"          '{i}': {json.dumps(c)}" for i, c in enumerate(meta.classes)]
    struct = _hf_json_struct(example or {})
    lines += ([f"  - name: {JSON}", "    struct:"] + struct) if struct else [f"  - name: {JSON}", "    dtype: binary"]
    if meta.spec_shape:
        lines += [f"  - name: {SPEC}", "    dtype:", "      array2_d:",
                  f"        shape: [{meta.spec_shape[0]}, {meta.spec_shape[1]}]", f"        dtype: {meta.spec_dtype}"]
    for i in range(max(1, meta.max_frames or 1)):
        lines += [f"  - name: {frame_name(i)}", "    dtype: image"]
    lines += ["  - name: __key__", "    dtype: string", "  - name: __url__", "    dtype: string", "  splits:"]
    for split, m in manifests.items():
        lines += [f"  - name: {hf_split(split)}", f"    num_bytes: {sum(s.bytes for s in m.shards)}",
                  f"    num_examples: {m.num_samples}"]
    renamed = [f"`{s}` is `{hf_split(s)}`" for s in manifests if hf_split(s) != s]
    lines += ["---", "", f"# {meta.name or 'dataset'}", "",
              (f"Written by `avprep extract`: WebDataset shards, one sample per clip (`{CLS}` label index, "
               f"`{JSON}` metadata, `{SPEC}` {meta.spec_dtype} spectrogram of shape {list(meta.spec_shape or [])}, "
               f"frames `{frame_name(0)}`...; at most {meta.max_frames} frames). Sample index with byte offsets: "
               f"`<split>{INDEX_SUFFIX}`; wids index: `<split>{WIDS_SUFFIX}`."), ""]
    if renamed:
        lines += [(f"Splits here have Hugging Face's names ({', '.join(renamed)}: `datasets.load_dataset` gives "
                   f"{', '.join(hf_split(s) for s in manifests)}); the files keep avprep's "
                   f"(`{next(s for s in manifests if hf_split(s) != s)}-000000.tar`, ...)."), ""]
    return ("\n".join(lines) + "\n").encode("utf-8")


def write_card(out, meta: DatasetMeta, manifests: dict[str, Manifest], write, open_shard=None) -> None:
    """``OUT/README.md``, its json struct taken from the first sample of the first shard, read
    with ``open_shard(name)`` (a binary stream; default: the file in ``out``)."""
    example = None
    for m in manifests.values():
        if m.shards:
            path = Path(out) / m.shards[0].name
            with (open_shard(path.name) if open_shard else open(path, "rb")) as f:
                for s in read_shard_samples(f, str(path), crc=False, keep=lambda ext: ext == JSON):
                    try:
                        example = json.loads(bytes(s.members.get(JSON, b"{}")))
                    except ValueError:
                        example = None
                    break
            break
    write(Path(out) / CARD, dataset_card(meta, manifests, example if isinstance(example, dict) else None))
