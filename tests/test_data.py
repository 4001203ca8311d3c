"""ogmge_train.data and .transforms: exact-once evaluation over local/http/s3, seeded training
shuffles, equal DDP steps, rank/worker splits, safe decoding, frame sampling and transforms."""
from __future__ import annotations

import io
import pickle
import random
import tarfile
import threading
import time

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from avprep.errors import StorageError
from avprep.storage import Retry
from avprep.upload import upload_folder
from ogmge_train import transforms as T
from ogmge_train.data import ShardDataError, make_loader, read_dataset
from ogmge_train.errors import ConfigError
from tests._helpers import publish, raw_header
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
    import json

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


# -- the streaming tar reader and batch decoding -------------------------------------------------
def _jpg(value: int, wh=(20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", wh, (value,) * 3).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _tar_bytes(members: list[tuple[str, bytes]], fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sample_members(key: str, n_frames: int = 3, label: int = 1) -> list[tuple[str, bytes]]:
    spec = np.arange(12, dtype=np.float16).reshape(3, 4)
    return ([(f"{key}.cls", str(label).encode()), (f"{key}.json", b'{"k": 1}'), (f"{key}.spec.npy", _npy(spec))]
            + [(f"{key}.f{j:03d}.jpg", _jpg(20 * j + 10)) for j in range(n_frames)])


class _Unseekable(io.RawIOBase):
    """A network-like stream: reads only, no seek (the reader must read-and-discard)."""

    def __init__(self, data: bytes):
        self._f = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, b):
        return self._f.readinto(b)


def _read_all(data: bytes, seekable: bool, **kw):
    from ogmge_train.data import read_samples

    stream = io.BufferedReader(io.BytesIO(data) if seekable else _Unseekable(data))
    return list(read_samples(stream, "mem.tar", **{"frames": 1, "train": False, **kw}))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("seekable", [True, False])
def test_tar_reader_matches_tarfile(fmt, seekable):
    """Long names (ustar prefix, GNU longname, pax path), non-ASCII keys and skipped members:
    every kept member's bytes equal what tarfile extracts."""
    long_dir = "d" * 60 + "/" + "e" * 60   # > 100 characters with the file name
    keys = [f"{long_dir}/clip_{i}" for i in range(3)] + (["clïp_ü"] if fmt != tarfile.USTAR_FORMAT else [])
    members = [m for k in keys for m in _sample_members(k)] + [("README", b"no extension: not a sample")]
    data = _tar_bytes(members, fmt)
    samples = _read_all(data, seekable, keep_json=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        ref = {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}
    assert [s.key for s in samples] == keys
    for s in samples:
        for ext in ("cls", "json", "spec.npy"):
            assert bytes(s.members[ext]) == ref[f"{s.key}.{ext}"]
        assert [(e, bytes(b)) for e, b in s.frames] == [("f001.jpg", ref[f"{s.key}.f001.jpg"])]  # middle of 3
    # json is skipped unread unless asked for
    assert all("json" not in s.members for s in _read_all(data, seekable))


def test_tar_reader_keeps_only_selected_frames_in_time_order():
    members = _sample_members("k", n_frames=5)
    members = members[:3] + members[3:][::-1]    # frames stored out of order
    (s,) = _read_all(_tar_bytes(members), True, frames=3)
    assert [e for e, _ in s.frames] == ["f000.jpg", "f002.jpg", "f004.jpg"]
    (s,) = _read_all(_tar_bytes(members), True, frames=2, train=True, rng=random.Random(0))
    assert [e for e, _ in s.frames][0] in ("f000.jpg", "f001.jpg", "f002.jpg")


@pytest.mark.parametrize("seekable", [True, False])
@pytest.mark.parametrize("cut", ["member", "boundary", "empty"])
def test_truncated_shard_is_an_error(seekable, cut):
    """A shard cut anywhere (also exactly between two members, where tarfile would stop quietly)
    raises instead of silently dropping samples from an evaluation."""
    data = _tar_bytes(_sample_members("a") + _sample_members("b"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        one = tar.getmember("b.cls").offset   # the boundary between the two samples' members
    data = {"member": data[:one + 700], "boundary": data[:one], "empty": b""}[cut]
    with pytest.raises(ShardDataError, match=r"mem\.tar: not a readable tar shard \((truncated|empty)"):
        _read_all(data, seekable)


def test_corrupt_and_compressed_shards_are_errors():
    data = bytearray(_tar_bytes(_sample_members("a")))
    data[1024 + 50] ^= 0xFF   # inside the second header (the 1-byte .cls payload fills 512..1024)
    with pytest.raises(ShardDataError, match=r"mem\.tar: not a readable tar shard \(bad header at byte 1024\)"):
        _read_all(bytes(data), True)
    huge = tarfile.TarInfo("a.spec.npy")
    huge.size = 1 << 33     # a hostile header: refused before anything is allocated
    with pytest.raises(ShardDataError, match=r"a member of 8589934592 bytes at byte 0; the limit is 256 MiB"):
        _read_all(huge.tobuf(tarfile.GNU_FORMAT), True)
    import gzip
    with pytest.raises(ShardDataError, match="gzip-compressed"):
        _read_all(gzip.compress(_tar_bytes(_sample_members("a"))), True)


@pytest.mark.parametrize("seekable", [True, False])
def test_hostile_sizes_are_errors_not_endless_loops(seekable):
    """A negative size (``int(.., 8)`` accepts a sign) would seek backwards onto the same header
    forever; a pax record of length 0 would never advance. Both are bad headers."""
    negative = raw_header("a.xyz", b"-0000001000\0") + bytes(1024)
    with pytest.raises(ShardDataError, match=r"bad header at byte 0"):
        _read_all(negative, seekable)
    record = b"0 path=x\n"
    pax = raw_header("p", b"%011o\0" % len(record), b"x") + record.ljust(512, b"\0") + bytes(1024)
    with pytest.raises(ShardDataError, match=r"bad pax header"):
        _read_all(pax, seekable)
    negative_pax = b"13 size=-512\n"
    pax = raw_header("p", b"%011o\0" % len(negative_pax), b"x") + negative_pax.ljust(512, b"\0") + bytes(1024)
    with pytest.raises(ShardDataError, match=r"bad pax header"):
        _read_all(pax, seekable)


@pytest.mark.parametrize("seekable", [True, False])
def test_pickle_member_refused_by_name_before_reading(seekable):
    members = _sample_members("a") + [("a.pkl", b"\x80\x04 never read")] + _sample_members("b")
    with pytest.raises(ShardDataError, match=r"mem\.tar: sample a: pickle member \.pkl"):
        _read_all(_tar_bytes(members), seekable)
    with pytest.raises(ShardDataError, match=r"sample a: member \.cls appears twice"):
        _read_all(_tar_bytes(_sample_members("a") + [("a.cls", b"2")]), seekable)


def _decode(members, **kw):
    from ogmge_train.data import decode_batch

    samples = _read_all(_tar_bytes(members), True)
    return decode_batch(samples, **{"train": False, "image_size": 8, **kw})


@pytest.mark.parametrize("arr", [np.arange(12, dtype=">f4").reshape(3, 4),               # big-endian
                                 np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
                                 np.arange(12, dtype=np.float16).reshape(3, 4)])
def test_spec_layouts_decode_exactly(arr):
    members = [(n, _npy(arr) if n.endswith("spec.npy") else b) for n, b in _sample_members("a")]
    batch = _decode(members)
    assert batch["audio"].shape == (1, 1, 3, 4) and batch["audio"].dtype == torch.float32
    assert torch.equal(batch["audio"][0, 0], torch.from_numpy(arr.astype(np.float32)))


def test_bad_spec_members_are_errors():
    def with_spec(data):
        return [(n, data if n.endswith("spec.npy") else b) for n, b in _sample_members("a")]

    whole = _npy(np.zeros((3, 4), np.float32))
    for data, problem in [(whole[:-4], "holds 44 data bytes, not the 48"), (b"garbage", "not a .npy file"),
                          (whole + b"\0" * 4, "holds 52 data bytes, not the 48"),
                          (_npy(np.zeros(5, np.float32)), "expected a 2-D float array"),
                          (_npy(np.zeros((2, 2), np.int32)), "expected a 2-D float array")]:
        with pytest.raises(ShardDataError, match=rf"mem\.tar: sample a: spec\.npy .*{problem}"):
            _decode(with_spec(data))
    other = [(n.replace("b.", "b."), _npy(np.zeros((4, 4), np.float16)) if n.endswith("spec.npy") else d)
             for n, d in _sample_members("b")]
    with pytest.raises(ShardDataError, match=r"sample b: spec\.npy shape \(4, 4\), the dataset's is \(3, 4\)"):
        _decode(_sample_members("a") + other)


def test_decoded_frames_equal_the_straightforward_transform():
    """The batch path (uint8 until one conversion into the batch slot) is bit-identical to
    decode -> resize -> (x / 255 - mean) / std computed directly."""
    buf = io.BytesIO()
    _noise_image(48, 36).save(buf, format="JPEG", quality=90)
    members = [(n, buf.getvalue() if n.endswith(".jpg") else b) for n, b in _sample_members("a", n_frames=1)]
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
