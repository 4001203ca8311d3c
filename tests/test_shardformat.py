"""The shard format module and the sample-granular loader built on it: the sample index, the
partition of samples among ranks × workers, corrupt-sample handling over local/http/s3, one
refused-member list for verify and loader, and the `avprep index` command."""
from __future__ import annotations

import ast
import io
import json
import re
import shutil
import tarfile
import zlib
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch

from avprep import shardformat as sf
from avprep.shards import index_dataset
from avprep.storage import Retry
from avprep.upload import upload_folder
from avprep.verify import verify
from ogmge_train.data import _worker_steps, make_loader, plan_eval, plan_train, read_dataset, run_starts, to_device
from ogmge_train.errors import DataError
from tests._helpers import publish
from tests._servers import write_shard_folder

FAST = Retry(tries=4, base_delay=0.1, max_delay=0.5, budget_s=5.0, connect_timeout=2.0, read_timeout=5.0)
SHARDS = {"train": [5, 4, 6, 3, 5], "val": [4, 3]}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("sf")
    keys = write_shard_folder(out, SHARDS, n_frames=2)
    return out, keys


def _entries(counts):
    """Index entries of shards with ``counts`` samples (offsets as a writer would give)."""
    out, n = [], 0
    for s, c in enumerate(counts):
        off = 0
        for _ in range(c):
            out.append(sf.IndexEntry(f"k{n:04d}", "a", 0, sf.shard_name("train", s), "", 0.0, off, 1024, 0))
            off += 1024
            n += 1
    return out


# -- the partition ------------------------------------------------------------------------------
@pytest.mark.parametrize("world, workers, shards", list(product([1, 2, 3], [0, 1, 2, 3], [1, 2, 5])))
def test_partition_property(world, workers, shards):
    counts = [23 // shards + (1 if i < 23 % shards else 0) for i in range(shards)]
    entries = _entries(counts)
    n, nw, batch = len(entries), max(workers, 1), 2
    # evaluation: every sample exactly once across all consumers
    seen = [i for r in range(world) for w in range(nw)
            for i in plan_eval(n, rank=r, world_size=world, worker=w, num_workers=nw)]
    assert sorted(seen) == list(range(n))
    # training: each sample at most once, all but less than one global batch, equal steps per rank
    steps = n // (batch * world)
    epochs = []
    for epoch in (0, 1):
        per_rank = []
        for r in range(world):
            parts = [plan_train(entries, batch_size=batch, steps=steps, seed=7, epoch=epoch, run=2, rank=r,
                                world_size=world, worker=w, num_workers=nw) for w in range(nw)]
            assert [len(p) for p in parts] == [_worker_steps(steps, w, nw) * batch for w in range(nw)]
            per_rank.append([i for p in parts for i in p])
        flat = [i for p in per_rank for i in p]
        assert len(flat) == len(set(flat)) == steps * batch * world > n - batch * world
        assert all(len(p) == steps * batch for p in per_rank)
        epochs.append(flat)
    again = [i for r in range(world) for w in range(nw)
             for i in plan_train(entries, batch_size=batch, steps=steps, seed=7, epoch=0, run=2, rank=r,
                                 world_size=world, worker=w, num_workers=nw)]
    assert again == epochs[0] and epochs[0] != epochs[1]
    # runs never cross a shard and hold at most ``run`` samples
    starts = run_starts(entries, 2) + [n]
    assert all(0 < b - a <= 2 and len({entries[i].shard for i in range(a, b)}) == 1
               for a, b in zip(starts, starts[1:]))


@pytest.fixture(scope="module")
def remote(ds, http_server, s3_server):
    return publish(ds[0], "sf", http_server, s3_server)


@pytest.mark.parametrize("kind", ["local", "http", "s3"])
@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (3, 1)])
def test_loader_partition_over_storage(kind, world, workers, ds, remote, s3_server):
    _, keys = ds
    kw = {"frames": 1, "image_size": 16, "workers": workers, "world_size": world, "retry": FAST,
          "s3_endpoint": s3_server.endpoint}
    evald = [k for r in range(world) for b in make_loader(remote[kind], "val", train=False, batch_size=2, rank=r, **kw)
             for k in b["key"]]
    assert sorted(evald) == keys["val"]
    orders = []
    for epoch in (0, 1):
        batches = [[b["key"] for b in make_loader(remote[kind], "train", train=True, batch_size=2, rank=r,
                                                  epoch=epoch, seed=3, **kw)] for r in range(world)]
        assert len({len(b) for b in batches}) == 1          # equal steps on every rank
        flat = [k for rank in batches for b in rank for k in b]
        assert len(flat) == len(set(flat)) > len(keys["train"]) - 2 * world and set(flat) <= set(keys["train"])
        orders.append(flat)
    assert orders[0] != orders[1]


def test_batches_mix_shards(ds):
    out, _ = ds
    info = read_dataset(out)
    shard_of = {e.key: e.shard for e in info.index("train")}
    loader = make_loader(info, "train", train=True, batch_size=4, frames=1, image_size=16, workers=1, run=1)
    assert any(len({shard_of[k] for k in b["key"]}) > 1 for b in loader)


def test_one_shard_many_consumers(tmp_path):
    """The README's failure: 1 train shard, 1 rank × 2 workers (and 3 ranks × 4 workers)."""
    keys = write_shard_folder(tmp_path, {"train": [12], "val": [5]}, n_frames=1)
    seen = [k for b in make_loader(tmp_path, "train", train=True, batch_size=3, frames=1, image_size=8, workers=2)
            for k in b["key"]]
    assert sorted(seen) == keys["train"]
    seen = [k for r in range(3) for b in make_loader(tmp_path, "val", train=False, batch_size=2, frames=1,
                                                     image_size=8, workers=4, rank=r, world_size=3)
            for k in b["key"]]
    assert sorted(seen) == keys["val"]


# -- corrupt samples ----------------------------------------------------------------------------
def _flip_payload(out, split, n):
    """Flip one byte inside the payload of the n-th indexed sample; returns its key."""
    e = read_dataset(out).index(split)[n]
    path = out / e.shard
    data = bytearray(path.read_bytes())
    data[e.offset + e.length - 700] ^= 0x10      # inside the last frame's bytes
    path.write_bytes(bytes(data))
    return e.key


@pytest.mark.parametrize("kind", ["local", "http", "s3"])
def test_flipped_payload_byte_is_skipped_and_reported(kind, tmp_path, http_server, s3_server):
    out = tmp_path / "d"
    keys = write_shard_folder(out, {"train": [4, 4], "val": [3, 3]}, n_frames=2)
    bad_key = _flip_payload(out, "val", 4)
    where = {"local": str(out)}
    if kind == "http":
        shutil.copytree(out, http_server.root / f"flip-{tmp_path.name}")
        where[kind] = f"{http_server.url}/flip-{tmp_path.name}"
    elif kind == "s3":
        bucket = s3_server.new_bucket()
        upload_folder(out, f"s3://{bucket}/d", s3_endpoint=s3_server.endpoint)
        where[kind] = f"s3://{bucket}/d"
    reported = []
    loader = make_loader(where[kind], "val", train=False, batch_size=2, frames=1, image_size=8, workers=0,
                         s3_endpoint=s3_server.endpoint, retry=FAST, max_bad_samples=1,
                         on_bad_sample=lambda url, key, msg: reported.append((url.rpartition("/")[2], key, msg)))
    seen = [k for b in loader for k in b["key"]]
    assert sorted(seen) == sorted(set(keys["val"]) - {bad_key})
    assert reported == [("val-000001.tar", bad_key, "bytes do not match the CRC-32 of the sample index")]
    ones = make_loader(where[kind], "val", train=False, batch_size=1, frames=1, image_size=8, workers=0,
                       s3_endpoint=s3_server.endpoint, retry=FAST, max_bad_samples=1)
    assert len([b for b in ones]) == 5     # the batch left empty is dropped, not an error, in evaluation
    strict = make_loader(where[kind], "val", train=False, batch_size=2, frames=1, image_size=8, workers=0,
                         s3_endpoint=s3_server.endpoint, retry=FAST, max_bad_samples=0)
    with pytest.raises(DataError, match=rf"val-000001\.tar: sample {bad_key}: bytes do not match"):
        list(strict)


def _rewrite_sample(out, split, n, edit):
    """Rewrite the n-th sample's members with ``edit(members)`` and re-index (so its CRC passes and
    only the content is wrong)."""
    e = read_dataset(out).index(split)[n]
    path = out / e.shard
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    from avprep.shards import ShardWriter
    with ShardWriter(path) as w:
        key, group = None, {}
        for name, data in members + [("", b"")]:
            k, ext = sf.split_name(name) if name else (None, None)
            if k != key and key is not None:
                w.add(key, edit(group) if key == e.key else group)
                group = {}
            key = k
            if name:
                group[ext] = data
        w.commit()
    index_dataset(out)
    return e.key


@pytest.mark.parametrize("edit, problem", [
    (lambda m: {**m, "cls": b"999"}, "label index 999 not in 0..2"),
    (lambda m: {**m, "cls": b"-1"}, "not an ASCII integer"),
    (lambda m: {**m, "cls": b"33333333333333333333"}, "not an ASCII integer"),
    (lambda m: {**m, "spec.npy": _npy_with(np.nan)}, "1 non-finite values"),
    (lambda m: {**m, "spec.npy": _npy_with(np.inf)}, "1 non-finite values"),
    (lambda m: {**m, "spec.npy": b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f2',}"}, "bad .npy header"),
    (lambda m: {**m, "spec.npy": m["spec.npy"] + b"\0\0"}, "holds 194 data bytes, not the 192"),
], ids=["label-999", "label-neg", "label-overflow", "nan", "inf", "npy-header", "npy-trailing"])
def test_bad_content_is_a_corrupt_sample_for_loader_and_verify(tmp_path, edit, problem):
    write_shard_folder(tmp_path, {"train": [3, 3], "val": [3]}, n_frames=1)
    key = _rewrite_sample(tmp_path, "train", 4, edit)
    reported = []
    loader = make_loader(tmp_path, "train", train=False, batch_size=2, frames=1, image_size=8, workers=0,
                         max_bad_samples=5, on_bad_sample=lambda u, k, m: reported.append((k, m)))
    assert key not in [k for b in loader for k in b["key"]]
    assert len(reported) == 1 and reported[0][0] == key and problem in reported[0][1]
    report = verify(tmp_path)
    assert {p.key for p in report.problems if p.key} == {key}
    assert any(problem in p.message for p in report.problems)
    with pytest.raises(DataError, match=rf"sample {key}:"):      # training too: past the threshold
        list(make_loader(tmp_path, "train", train=True, batch_size=2, frames=1, image_size=8, workers=0,
                         max_bad_samples=0))


def _npy_with(value) -> bytes:
    a = np.zeros((8, 12), np.float16)
    a[2, 3] = value
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.mark.parametrize("ext", ["pkl", "PKL", "ckpt", "pt", "pth", "pickle", "pyd", "spec.Pickle"])
def test_verify_and_loader_refuse_the_same_member_names(tmp_path, ext):
    write_shard_folder(tmp_path, {"train": [2], "val": [2]}, n_frames=1)
    key = _rewrite_sample(tmp_path, "val", 1, lambda m: {**m, ext: b"\x80\x04never read"})
    assert sf.is_refused(ext)
    report = verify(tmp_path)
    assert [(p.key, p.check) for p in report.problems if p.key] == [(key, "security")]   # (+ the stale sha256)
    with pytest.raises(sf.ShardDataError, match=rf"sample {key}: pickle member \.{ext}"):
        list(make_loader(tmp_path, "val", train=False, batch_size=2, frames=1, image_size=8, workers=0))


def test_frame_names_follow_one_pattern(tmp_path):
    """``f1.jpg`` is not a frame for anyone: verify reports it, the loader skips the sample."""
    write_shard_folder(tmp_path, {"train": [2], "val": [2]}, n_frames=2)
    key = _rewrite_sample(tmp_path, "val", 0, lambda m: {("f1.jpg" if k == "f001.jpg" else k): v for k, v in m.items()})
    report = verify(tmp_path)
    assert (key, "member") in {(p.key, p.check) for p in report.problems}
    reported = []
    list(make_loader(tmp_path, "val", train=False, batch_size=2, frames=1, image_size=8, workers=0,
                     max_bad_samples=1, on_bad_sample=lambda u, k, m: reported.append(k)))
    assert reported == [key]


# -- the index ----------------------------------------------------------------------------------
def test_writer_index_matches_the_tar(ds):
    out, _ = ds
    for split in SHARDS:
        index = sf.SampleIndex.from_json((out / sf.index_name(split)).read_bytes(), split, "x")
        for shard, entries in index.by_shard().items():
            data = (out / shard).read_bytes()
            spans = [(s.key, s.offset, s.length, s.crc32)
                     for s in sf.read_shard_samples(io.BytesIO(data), shard, size=len(data))]
            assert spans == [(e.key, e.offset, e.length, e.crc32) for e in entries]
            assert all(zlib.crc32(data[e.offset:e.offset + e.length]) == e.crc32 for e in entries)
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:   # offsets are real tar header offsets
                firsts = {m.name.split(".", 1)[0]: m.offset for m in reversed(tar.getmembers())}
            assert {e.key: e.offset for e in entries} == firsts


def test_verify_catches_a_wrong_offset(tmp_path):
    write_shard_folder(tmp_path, {"train": [3], "val": [2]}, n_frames=1)
    path = tmp_path / "train.samples.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    lines[1]["offset"] += 512
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    report = verify(tmp_path)
    key = lines[1]["key"]
    # the key is judged by the bytes the index points at (what the loader would read) ...
    assert [(p.shard, p.key, p.check) for p in report.problems if p.key] == [("train-000000.tar", key, "checksum")]
    # ... and the shard reports where the sample really is
    assert any(p.check == "index" and f"sample {key}: offset/length/crc32" in p.message for p in report.problems)
    assert {p.shard for p in report.problems} == {"train-000000.tar"}


def test_index_command_adds_the_index_without_touching_shards(tmp_path):
    write_shard_folder(tmp_path, {"train": [3, 2], "val": [2]}, n_frames=2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for split in SHARDS:    # as an older avprep wrote it: no offsets
        path = tmp_path / sf.index_name(split)
        if path.exists():
            rows = [{k: v for k, v in json.loads(x).items() if k not in (*sf.INDEX_FIELDS, "n_frames")}
                    for x in path.read_text().splitlines()]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / sf.wids_name(split)).unlink(missing_ok=True)
    with pytest.raises(sf.ShardDataError, match=r"no byte offsets in the sample index .*`avprep index OUT`"):
        make_loader(tmp_path, "val", train=False, batch_size=2, frames=1)
    from click.testing import CliRunner

    from cli.avprep_cli import main
    result = CliRunner().invoke(main, ["index", str(tmp_path)])
    assert result.exit_code == 0, result.output
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before      # shards untouched, index and wids index as the writer made them
    assert verify(tmp_path).ok


def test_uint8_visual_normalised_on_device_equals_float(ds):
    out, _ = ds
    kw = {"train": False, "batch_size": 3, "frames": 2, "image_size": 16, "workers": 0}
    f = next(iter(make_loader(out, "val", **kw)))
    u = next(iter(make_loader(out, "val", visual_dtype=torch.uint8, **kw)))
    assert u["visual"].dtype == torch.uint8 and u["visual"].element_size() * 4 == f["visual"].element_size()
    audio, visual, label = to_device(u, "cpu")
    assert torch.equal(visual, f["visual"]) and torch.equal(audio, f["audio"]) and torch.equal(label, f["label"])


def test_dataset_json_records_shape_and_frames(raw_dataset, tmp_path):
    from avprep.config import ExtractConfig, spec_preset
    from avprep.extract import extract

    raw = raw_dataset("cremad", clips=8)
    cfg = ExtractConfig(spec=spec_preset("paper", "cremad", duration=1.0), frame_size=32, shard_size=3)
    extract("cremad", raw, tmp_path / "o", cfg, workers=1)
    meta = json.loads((tmp_path / "o" / "dataset.json").read_text())
    assert meta["spec_shape"] == list(cfg.spec.shape) and meta["spec_dtype"] == "float16"
    index = [json.loads(x) for s in meta["splits"] for x in (tmp_path / "o" / f"{s}.samples.jsonl").read_text().splitlines()]
    assert meta["max_frames"] == max(r["n_frames"] for r in index)
    assert sum(meta["frame_histogram"].values()) == len(index) == sum(meta["splits"].values())
    wids = json.loads((tmp_path / "o" / "train.wids.json").read_text())
    assert wids["wids_version"] == 1 and sum(s["nsamples"] for s in wids["shardlist"]) == meta["splits"]["train"]
    assert verify(tmp_path / "o").ok


def test_http_reads_are_byte_ranges_over_runs_not_members(ds, remote, http_server):
    before = len(http_server.log)
    keys = [k for b in make_loader(remote["http"], "val", train=False, batch_size=2, frames=1, image_size=8,
                                   workers=0, retry=FAST) for k in b["key"]]
    tars = [(m, p, r) for m, p, r in http_server.log[before:] if p.endswith(".tar")]
    assert len(keys) == 7 and len(tars) == len(SHARDS["val"])      # one ranged GET per run (here: per shard)
    assert all(m == "GET" and r and r.startswith("bytes=") for m, p, r in tars)


def test_missing_index_names_the_fix(tmp_path):
    write_shard_folder(tmp_path, {"train": [2], "val": [2]}, n_frames=1)
    (tmp_path / "val.samples.jsonl").unlink()
    with pytest.raises(sf.ShardDataError, match=r"val\.samples\.jsonl: no sample index .*`avprep index OUT`"):
        make_loader(tmp_path, "val", train=False, batch_size=2, frames=1)
    index_dataset(tmp_path)
    assert len([k for b in make_loader(tmp_path, "val", train=False, batch_size=2, frames=1, image_size=8,
                                       workers=0) for k in b["key"]]) == 2


# -- one owner of the names ---------------------------------------------------------------------
# What avprep writes and reads is spelled in avprep/shardformat only: file names of an output folder
# and sample member names, found in any string of the package sources outside it (docstrings aside).
_OUTPUT_NAMES = re.compile(r"dataset\.json|README\.md|failures\.jsonl|\.manifest\.json|\.samples\.jsonl|\.wids\.json"
                           r"|\.tar\b|spec\.npy|\.npy\b|\.jpg\b")
_MEMBERS = {sf.CLS, sf.JSON}     # also problem checks ("json", "cls"): a member where used as a key or compared
_NOT_OURS = {("avprep/datasets/_base.py", "NOT_MEDIA")}     # raw files discovery skips, not our outputs
_ROOT = Path(__file__).resolve().parent.parent


def _spelled_names(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    rel = path.relative_to(_ROOT).as_posix()
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in docstrings:
            continue
        statement = parents.get(id(node))
        while statement is not None and not isinstance(statement, ast.stmt):
            statement = parents.get(id(statement))
        if isinstance(statement, ast.Assign) and any((rel, getattr(t, "id", "")) in _NOT_OURS
                                                     for t in statement.targets):
            continue
        parent = parents.get(id(node))
        while isinstance(parent, (ast.Tuple, ast.List, ast.Set, ast.JoinedStr)):
            parent = parents.get(id(parent))
        as_member = node.value in _MEMBERS and (
            isinstance(parent, (ast.Subscript, ast.Compare))
            or isinstance(parent, ast.Call) and getattr(parent.func, "attr", "") in ("get", "pop"))
        if as_member or _OUTPUT_NAMES.search(node.value):
            found.append(f"{rel}:{node.lineno}: {node.value!r}")
    return found


def test_only_shardformat_spells_the_output_names():
    sources = [p for pkg in ("avprep", "ogmge_train", "cli") for p in sorted((_ROOT / pkg).rglob("*.py"))
               if p.relative_to(_ROOT).parts[:2] != ("avprep", "shardformat")]
    assert len(sources) > 40
    assert [hit for p in sources for hit in _spelled_names(p)] == []


def test_the_names_check_sees_what_it_must(tmp_path):
    """The check above flags a spelled name in code, an f-string, a member key and a comparison,
    and leaves docstrings and problem check labels alone."""
    (tmp_path / "avprep").mkdir()
    probe = tmp_path / "avprep" / "probe.py"
    probe.write_text('"""Writes dataset.json."""\n'
                     'A = out / "dataset.json"\n'
                     'B = f"{split}.manifest.json"\n'
                     'C = members["cls"]\n'
                     'D = ext == "json"\n'
                     'E = bad("json", "no frames")\n'
                     'F = f"frame f{i:03d}.jpg"\n')
    global _ROOT
    root, _ROOT = _ROOT, tmp_path
    try:
        hits = _spelled_names(probe)
    finally:
        _ROOT = root
    assert [h.split(":")[1] for h in hits] == ["2", "3", "4", "5", "7"]
