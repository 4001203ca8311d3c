"""ogmge_train.data and .transforms: exact-once evaluation over local/http/s3, seeded training
shuffles, equal DDP steps, the partition of samples among ranks × workers, byte-range reads,
corrupt samples skipped and reported (the same verdict as verify), safe decoding, frame sampling
and transforms."""
from __future__ import annotations

import io
import json
import pickle
import random
import shutil
import tarfile
import threading
import time
from itertools import product

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from avprep import shardformat as sf
from avprep.errors import StorageError
from avprep.shards import index_dataset
from avprep.storage import Retry
from avprep.upload import upload_folder
from avprep.verify import verify
from ogmge_train import transforms as T
from ogmge_train.data import (
    ShardDataError,
    _worker_steps,
    make_loader,
    plan_eval,
    plan_train,
    read_dataset,
    run_starts,
    to_device,
)
from ogmge_train.errors import ConfigError, DataError
from tests._helpers import npy_bytes, publish, sample_members, tar_bytes
from tests._servers import MotoS3, write_shard_folder

SHARDS = {"train": [5, 3, 4, 2], "val": [3, 3, 2]}
N_FRAMES = 5
FAST = Retry(tries=8, base_delay=0.2, max_delay=1.0, budget_s=10.0, connect_timeout=2.0, read_timeout=5.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    keys = write_shard_folder(out, SHARDS, n_frames=N_FRAMES)
    return out, keys


@pytest.fixture(scope="module")
def sources(data, http_server, s3_server):
    return publish(data[0], "data", http_server, s3_server)


def _keys(loader):
    return [k for batch in loader for k in batch["key"]]


def _label(key: str) -> int:
    return int(key.split("_")[1]) % 3


# -- evaluation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["local", "http", "s3"])
def test_eval_epoch_yields_manifest_samples_once(kind, sources, data, s3_server):
    _, keys = data
    loader = make_loader(sources[kind], "val", train=False, batch_size=2, frames=3, image_size=32, workers=2,
                         s3_endpoint=s3_server.endpoint, retry=FAST)
    batches = list(loader)
    seen = [k for b in batches for k in b["key"]]
    assert sorted(seen) == keys["val"] and len(seen) == len(set(seen))
    assert len(batches) == len(loader) == 4  # each worker reads a block of 4 samples: 2 batches each
    for b in batches:
        n = len(b["key"])
        assert b["audio"].shape == (n, 1, 8, 12) and b["audio"].dtype == torch.float32
        assert b["visual"].shape == (n, 3, 3, 32, 32) and b["visual"].dtype == torch.float32
        assert b["label"].dtype == torch.int64 and b["label"].tolist() == [_label(k) for k in b["key"]]


def test_read_dataset(sources, data):
    info = read_dataset(sources["local"])
    assert info.classes == ["a", "b", "c"] and info.num_classes == 3
    assert {s: sp.num_samples for s, sp in info.splits.items()} == {"train": 14, "val": 8}
    assert [s.num_samples for s in info.split("train").shards] == SHARDS["train"]
    assert info.shard_urls("val")[0].endswith("val-000000.tar")
    with pytest.raises(ConfigError, match="no split 'test'"):
        info.split("test")


def test_audio_matches_shard_bytes(data):
    out, _ = data
    with tarfile.open(out / "val-000001.tar") as tar:
        ref = np.load(io.BytesIO(tar.extractfile("val_00004.spec.npy").read()), allow_pickle=False)
    loader = make_loader(out, "val", train=False, batch_size=8, frames=1, image_size=16, workers=0)
    (batch,) = list(loader)
    i = batch["key"].index("val_00004")
    assert torch.equal(batch["audio"][i, 0], torch.from_numpy(ref.astype(np.float32)))


def _frame_values(visual: torch.Tensor) -> list[int]:
    """Undo the normalisation; the synthetic frame j is flat grey 20 j + 10."""
    mean = torch.tensor(T.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(T.IMAGENET_STD).view(3, 1, 1)
    return [round(float((f * std + mean).mean() * 255 - 10) / 20) for f in visual]


def test_eval_frames_are_segment_middles_and_deterministic(data):
    out, _ = data
    runs = [next(iter(make_loader(out, "val", train=False, batch_size=3, frames=3, image_size=24, workers=0)))
            for _ in range(2)]
    assert torch.equal(runs[0]["visual"], runs[1]["visual"])
    for clip in runs[0]["visual"]:
        assert _frame_values(clip) == [0, 2, 4]  # middles of [0,1.67) [1.67,3.33) [3.33,5)


def test_train_frames_one_per_segment(data):
    out, _ = data
    loader = make_loader(out, "train", train=True, batch_size=2, frames=2, image_size=24, workers=0)
    picks = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        picks += [tuple(_frame_values(clip)) for b in loader for clip in b["visual"]]
    assert all(a in (0, 1, 2) and b in (2, 3, 4) for a, b in picks)  # segments [0, 2.5) and [2.5, 5)
    assert {a for a, _ in picks} == {0, 1, 2} and {b for _, b in picks} == {2, 3, 4}


def test_eval_ranks_cover_all_samples_disjointly(data):
    out, keys = data
    per_rank = [_keys(make_loader(out, "train", train=False, batch_size=4, frames=1, image_size=16, workers=2,
                                  rank=r, world_size=2)) for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == keys["train"]


# -- training ------------------------------------------------------------------------------------
def _train_keys(out, epoch, seed=0, **kw):
    kw = {"batch_size": 3, "frames": 1, "image_size": 16, "workers": 2, **kw}
    return [b["key"] for b in make_loader(out, "train", train=True, seed=seed, epoch=epoch, **kw)]


def test_train_shuffle_is_seeded_and_changes_per_epoch(data):
    out, keys = data
    e0, e0_again, e1 = _train_keys(out, 0), _train_keys(out, 0), _train_keys(out, 1)
    assert e0 == e0_again and e0 != e1 and _train_keys(out, 0, seed=1) != e0
    assert len(e0) == 14 // 3 and all(len(b) == 3 for b in e0)
    for epoch in (e0, e1):  # 12 of 14 samples, none twice
        flat = [k for b in epoch for k in b]
        assert len(set(flat)) == len(flat) and set(flat) <= set(keys["train"])


def test_set_epoch_reaches_persistent_workers(data):
    out, _ = data
    loader = make_loader(out, "train", train=True, batch_size=3, frames=1, image_size=16, workers=2,
                         persistent_workers=True)
    first = [b["key"] for b in loader]
    loader.set_epoch(1)
    assert [b["key"] for b in loader] == _train_keys(out, 1) != first


def test_equal_steps_per_rank_with_uneven_shards(data):
    out, _ = data
    info = read_dataset(out)
    for steps in (None, 2):  # default floor(14 / (2 * 2)) = 3
        counts, seen = [], []
        for rank in range(2):
            loader = make_loader(info, "train", train=True, batch_size=2, frames=1, image_size=16, workers=2,
                                 rank=rank, world_size=2, steps_per_epoch=steps)
            batches = list(loader)
            assert len(batches) == len(loader) and all(len(b["key"]) == 2 for b in batches)
            counts.append(len(batches))
            seen.append({k for b in batches for k in b["key"]})
        assert counts == [steps or 3] * 2
        assert not seen[0] & seen[1]  # ranks read disjoint samples
    with pytest.raises(ConfigError, match=r"14 samples, fewer than 4 steps × 2 × 2 rank"):
        make_loader(info, "train", train=True, batch_size=2, frames=1, world_size=2, steps_per_epoch=4)


def test_more_consumers_than_shards(data):
    out, keys = data
    # 2 ranks × 3 workers on 4 train shards: samples, not shards, are partitioned
    seen = [k for r in range(2) for k in _keys(make_loader(out, "train", train=True, batch_size=2, frames=1,
                                                            image_size=16, workers=3, rank=r, world_size=2))]
    assert len(seen) == len(set(seen)) == 12 and set(seen) <= set(keys["train"])
    # evaluation tolerates more workers × ranks than shards
    keys = [k for r in range(2) for k in _keys(make_loader(out, "val", train=False, batch_size=2, frames=1,
                                                            image_size=16, workers=3, rank=r, world_size=2))]
    assert len(keys) == len(set(keys)) == 8


def test_s3_server_restart_mid_epoch(data, aws_env):
    out, keys = data
    server = MotoS3()
    server.start()
    try:
        bucket = server.new_bucket()
        upload_folder(out, f"s3://{bucket}/d", s3_endpoint=server.endpoint)
        loader = make_loader(f"s3://{bucket}/d", "val", train=False, batch_size=1, frames=1, image_size=16,
                             workers=0, s3_endpoint=server.endpoint, retry=FAST)
        seen = []
        for i, batch in enumerate(loader):
            seen += batch["key"]
            if i == 0:  # the first shard is buffered; the next shard opens hit a dead server
                server.stop()
                threading.Timer(0.8, server.start).start()
        assert sorted(seen) == keys["val"]
    finally:
        time.sleep(1.0)
        server.stop()


def test_missing_shard_is_a_storage_error_naming_it(tmp_path):
    write_shard_folder(tmp_path, {"val": [2, 2]}, n_frames=1)
    (tmp_path / "val-000001.tar").unlink()
    with pytest.raises(StorageError, match="val-000001.tar"):
        _keys(make_loader(tmp_path, "val", train=False, batch_size=2, frames=1, image_size=16, workers=0))


# -- untrusted shards ----------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates a file: the side effect must never happen."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _poisoned(tmp_path, member: str, payload: bytes):
    write_shard_folder(tmp_path, {"val": [2]}, n_frames=1)
    shard = tmp_path / "val-000000.tar"
    good = list(wds.WebDataset(str(shard), shardshuffle=False))
    with wds.TarWriter(str(shard)) as w:
        for s in good:
            s = {k: v for k, v in s.items() if k != "__url__"}
            if s["__key__"] == "val_00001":
                s[member] = payload
            w.write(s)
    from avprep.shards import index_dataset
    index_dataset(tmp_path)     # the index of the rewritten shard, so the checksum passes


@pytest.mark.parametrize("workers", [0, 1])
def test_pickle_member_is_refused(tmp_path, workers):
    marker = tmp_path / "pwned"
    _poisoned(tmp_path, "pyd", pickle.dumps(_Payload(marker)))
    loader = make_loader(tmp_path, "val", train=False, batch_size=2, frames=1, image_size=16, workers=workers)
    with pytest.raises(ShardDataError, match=r"val-000000\.tar: sample val_00001: pickle member \.pyd"):
        list(loader)
    assert not marker.exists()


def test_pickled_npy_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    np.save(buf, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    _poisoned(tmp_path, "spec.npy", buf.getvalue())
    with pytest.raises(ShardDataError, match=r"val-000000\.tar: sample val_00001: spec\.npy holds Python objects"):
        list(make_loader(tmp_path, "val", train=False, batch_size=2, frames=1, image_size=16, workers=0))
    assert not marker.exists()


# -- the partition, storage kinds, corrupt samples (one parser with verify) ----------------------
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


@pytest.mark.parametrize("kind", ["local", "http", "s3"])
@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (3, 1)])
def test_loader_partition_over_storage(kind, world, workers, data, sources, s3_server):
    _, keys = data
    kw = {"frames": 1, "image_size": 16, "workers": workers, "world_size": world, "retry": FAST,
          "s3_endpoint": s3_server.endpoint}
    evald = [k for r in range(world) for b in make_loader(sources[kind], "val", train=False, batch_size=2, rank=r, **kw)
             for k in b["key"]]
    assert sorted(evald) == keys["val"]
    orders = []
    for epoch in (0, 1):
        batches = [[b["key"] for b in make_loader(sources[kind], "train", train=True, batch_size=2, rank=r,
                                                  epoch=epoch, seed=3, **kw)] for r in range(world)]
        assert len({len(b) for b in batches}) == 1          # equal steps on every rank
        flat = [k for rank in batches for b in rank for k in b]
        assert len(flat) == len(set(flat)) > len(keys["train"]) - 2 * world and set(flat) <= set(keys["train"])
        orders.append(flat)
    assert orders[0] != orders[1]


def test_batches_mix_shards(data):
    out, _ = data
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


def test_uint8_visual_normalised_on_device_equals_float(data):
    out, _ = data
    kw = {"train": False, "batch_size": 3, "frames": 2, "image_size": 16, "workers": 0}
    f = next(iter(make_loader(out, "val", **kw)))
    u = next(iter(make_loader(out, "val", visual_dtype=torch.uint8, **kw)))
    assert u["visual"].dtype == torch.uint8 and u["visual"].element_size() * 4 == f["visual"].element_size()
    audio, visual, label = to_device(u, "cpu")
    assert torch.equal(visual, f["visual"]) and torch.equal(audio, f["audio"]) and torch.equal(label, f["label"])


def test_http_reads_are_byte_ranges_over_runs_not_members(data, sources, http_server):
    before = len(http_server.log)
    keys = [k for b in make_loader(sources["http"], "val", train=False, batch_size=2, frames=1, image_size=8,
                                   workers=0, retry=FAST) for k in b["key"]]
    tars = [(m, p, r) for m, p, r in http_server.log[before:] if p.endswith(".tar")]
    # one ranged GET per run (here: per shard)
    assert len(keys) == sum(SHARDS["val"]) and len(tars) == len(SHARDS["val"])
    assert all(m == "GET" and r and r.startswith("bytes=") for m, p, r in tars)


# -- frame sampling and transforms ---------------------------------------------------------------
def test_select_frames_eval_and_train():
    assert T.select_frames(10, 3, False) == [1, 5, 8]
    assert T.select_frames(5, 1, False) == [2]
    assert T.select_frames(2, 3, False) == [0, 1, 1]  # fewer frames than segments: reuse, in order
    assert T.select_frames(1, 3, False) == [0, 0, 0]
    rng = random.Random(0)
    draws = [T.select_frames(10, 3, True, rng) for _ in range(300)]
    for i, (lo, hi) in enumerate([(0, 3), (3, 6), (6, 9)]):  # segment i spans [10i/3, 10(i+1)/3)
        assert {d[i] for d in draws} == set(range(lo, hi + 1))
    assert all(d == sorted(d) for d in draws)
    with pytest.raises(ValueError):
        T.select_frames(0, 3, False)


def _reference_eval(img: Image.Image, size: int) -> np.ndarray:
    x = np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float64) / 255.0
    return ((x - np.array(T.IMAGENET_MEAN)) / np.array(T.IMAGENET_STD)).transpose(2, 0, 1)


def _noise_image(w=64, h=48, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_eval_transform_matches_reference():
    img = _noise_image()
    out = T.eval_transform(img, 40)
    assert out.shape == (3, 40, 40) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), _reference_eval(img, 40), atol=1e-5)


def test_crop_params_follow_torchvision_ranges():
    rng = random.Random(1)
    for _ in range(500):
        top, left, h, w = T.crop_params(64, 48, rng)
        assert 0 <= top and top + h <= 48 and 0 <= left and left + w <= 64
        assert 0.08 * 64 * 48 * 0.8 <= h * w  # rounding slack
    # the fallback: a 10:1 strip is centre-cropped to the widest allowed ratio
    assert T.crop_params(1000, 100, random.Random(0), scale=(1.0, 1.0)) == (0, 433, 100, 133)


def test_train_crop_and_flip_are_shared_by_a_clip():
    img = _noise_image()
    clip = T.transform_clip([img, img, img], train=True, image_size=32, rng=random.Random(3))
    assert clip.shape == (3, 3, 32, 32)
    assert torch.equal(clip[0], clip[1]) and torch.equal(clip[1], clip[2])
    per_frame = T.transform_clip([img] * 3, train=True, image_size=32, rng=random.Random(3), per_frame=True)
    assert not torch.equal(per_frame[0], per_frame[1])
    # crop = exact region resize; flip mirrors it
    params = (5, 7, 30, 40)
    crop = T.train_transform(img, 20, params, flip=False)
    ref = _reference_eval(img.crop((7, 5, 47, 35)), 20)
    np.testing.assert_allclose(crop.numpy(), ref, atol=1e-5)
    assert torch.equal(T.train_transform(img, 20, params, flip=True), crop.flip(-1))


def test_train_transform_is_seeded():
    img = _noise_image()
    a = T.transform_clip([img], train=True, image_size=16, rng=random.Random(7))
    b = T.transform_clip([img], train=True, image_size=16, rng=random.Random(7))
    assert torch.equal(a, b)
    crops = {T.crop_params(64, 48, random.Random(s)) for s in range(20)}
    assert len(crops) > 15  # different seeds, different crops


# -- end to end with the real extractor ----------------------------------------------------------
def test_loader_reads_what_extract_wrote(raw_dataset, tmp_path):
    """Real encoded media -> avprep.extract shards -> this loader: every sample once, the
    spectrogram exactly as stored, labels from the sample index."""

    from avprep.config import ExtractConfig, spec_preset
    from avprep.extract import extract

    raw = raw_dataset("cremad", clips=8, seed=5)
    cfg = ExtractConfig(spec=spec_preset("paper", "cremad"), frame_size=48, shard_size=2)
    extract("cremad", raw, tmp_path, cfg, workers=1)
    info = read_dataset(tmp_path)
    assert info.classes == ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
    for split, sp in info.splits.items():
        index = {r["key"]: r for r in map(json.loads, (tmp_path / f"{split}.samples.jsonl").read_text().splitlines())}
        loader = make_loader(info, split, train=False, batch_size=3, frames=1, image_size=32, workers=2)
        batches = list(loader)
        keys = [k for b in batches for k in b["key"]]
        assert sorted(keys) == sorted(index) and len(keys) == sp.num_samples
        for b in batches:
            assert b["audio"].shape[1:] == (1, *cfg.spec.shape)
            assert b["label"].tolist() == [index[k]["label_index"] for k in b["key"]]
            assert b["visual"].shape[1:] == (1, 3, 32, 32)


# -- whole-shard reads and batch decoding -------------------------------------------------
def _read_all(data: bytes, **kw):
    """The loader's samples of a whole shard held in ``data`` (``read_samples``: no index)."""
    from ogmge_train.data import read_samples

    stream = io.BufferedReader(io.BytesIO(data))
    return list(read_samples(stream, "mem.tar", **{"frames": 1, "train": False, **kw}))


def test_tar_reader_keeps_only_selected_frames_in_time_order():
    members = sample_members("k", n_frames=5)
    members = members[:3] + members[3:][::-1]    # frames stored out of order
    (s,) = _read_all(tar_bytes(members), frames=3)
    assert [e for e, _ in s.frames] == ["f000.jpg", "f002.jpg", "f004.jpg"]
    (s,) = _read_all(tar_bytes(members), frames=2, train=True, rng=random.Random(0))
    assert [e for e, _ in s.frames][0] in ("f000.jpg", "f001.jpg", "f002.jpg")


def _decode(members, **kw):
    from ogmge_train.data import decode_batch

    samples = _read_all(tar_bytes(members))
    return decode_batch(samples, **{"train": False, "image_size": 8, **kw})


@pytest.mark.parametrize("arr", [np.arange(12, dtype=">f4").reshape(3, 4),               # big-endian
                                 np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
                                 np.arange(12, dtype=np.float16).reshape(3, 4)])
def test_spec_layouts_decode_exactly(arr):
    members = [(n, npy_bytes(arr) if n.endswith("spec.npy") else b) for n, b in sample_members("a")]
    batch = _decode(members)
    assert batch["audio"].shape == (1, 1, 3, 4) and batch["audio"].dtype == torch.float32
    assert torch.equal(batch["audio"][0, 0], torch.from_numpy(arr.astype(np.float32)))


def test_bad_spec_members_are_errors():
    def with_spec(data):
        return [(n, data if n.endswith("spec.npy") else b) for n, b in sample_members("a")]

    whole = npy_bytes(np.zeros((3, 4), np.float32))
    for data, problem in [(whole[:-4], "holds 44 data bytes, not the 48"), (b"garbage", "not a .npy file"),
                          (whole + b"\0" * 4, "holds 52 data bytes, not the 48"),
                          (npy_bytes(np.zeros(5, np.float32)), "expected a 2-D float array"),
                          (npy_bytes(np.zeros((2, 2), np.int32)), "expected a 2-D float array")]:
        with pytest.raises(ShardDataError, match=rf"mem\.tar: sample a: spec\.npy .*{problem}"):
            _decode(with_spec(data))
    other = [(n.replace("b.", "b."), npy_bytes(np.zeros((4, 4), np.float16)) if n.endswith("spec.npy") else d)
             for n, d in sample_members("b")]
    with pytest.raises(ShardDataError, match=r"sample b: spec\.npy shape \(4, 4\), the dataset's is \(3, 4\)"):
        _decode(sample_members("a") + other)


def test_decoded_frames_equal_the_straightforward_transform():
    """The batch path (uint8 until one conversion into the batch slot) is bit-identical to
    decode -> resize -> (x / 255 - mean) / std computed directly."""
    buf = io.BytesIO()
    _noise_image(48, 36).save(buf, format="JPEG", quality=90)
    members = [(n, buf.getvalue() if n.endswith(".jpg") else b) for n, b in sample_members("a", n_frames=1)]
    batch = _decode(members, image_size=24)
    img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB").resize((24, 24), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(T.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(T.IMAGENET_STD).view(3, 1, 1)
    assert torch.equal(batch["visual"][0, 0], (x - mean) / std)
    # the train path likewise, flip included
    rng_a, rng_b = random.Random(4), random.Random(4)
    got = T.transform_clip([Image.open(io.BytesIO(buf.getvalue()))] * 2, train=True, image_size=16, rng=rng_a)
    top, left, h, w = T.crop_params(48, 36, rng_b)
    flip = rng_b.random() < 0.5
    ref = Image.open(io.BytesIO(buf.getvalue())).convert("RGB").crop((left, top, left + w, top + h))
    ref = ref.resize((16, 16), Image.BILINEAR)
    ref = ref.transpose(Image.FLIP_LEFT_RIGHT) if flip else ref
    x = torch.from_numpy(np.asarray(ref, dtype=np.float32) / 255.0).permute(2, 0, 1)
    assert torch.equal(got[0], (x - mean) / std) and torch.equal(got[1], got[0])


class _SharedProbe(torch.utils.data.IterableDataset):
    def __iter__(self):
        from ogmge_train.data import _empty

        t = _empty(2, 3)
        t.fill_(7.0)
        yield t.is_shared(), t


def test_worker_batches_are_built_in_shared_memory():
    """Inside a DataLoader worker the batch tensors are born in shared memory, so sending them
    to the main process copies nothing (in the main process they are ordinary tensors)."""
    from ogmge_train.data import _empty

    ((shared, t),) = list(torch.utils.data.DataLoader(_SharedProbe(), batch_size=None, num_workers=1))
    assert shared and torch.equal(t, torch.full((2, 3), 7.0))
    assert not _empty(2, 3).is_shared()
