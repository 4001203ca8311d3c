"""Our output read by the readers people already use: Hugging Face ``datasets`` (through the
dataset card, streaming and not), ``wids`` (through ``<split>.wids.json``) and ``webdataset``."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def out(raw_dataset, tmp_path_factory):
    from avprep.config import ExtractConfig, spec_preset
    from avprep.extract import extract

    raw = raw_dataset("cremad", clips=12, duration=None)     # real lengths: frame counts differ
    out = tmp_path_factory.mktemp("third") / "out"
    cfg = ExtractConfig(spec=spec_preset("paper", "cremad", duration=1.0), frame_size=32, shard_size=4)
    extract("cremad", raw, out, cfg, workers=1, seed=1)     # seed 1: the hash split gives train, val and test
    return out


def _index(out, split):
    return [json.loads(x) for x in (out / f"{split}.samples.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("streaming", [False, True])
def test_hugging_face_datasets_reads_the_card(out, tmp_path, streaming):
    datasets = pytest.importorskip("datasets")
    meta = json.loads((out / "dataset.json").read_text())
    assert len(meta["frame_histogram"]) > 1       # the case inference cannot handle
    ds = datasets.load_dataset(str(out), cache_dir=str(tmp_path), streaming=streaming)
    # Hugging Face's split names: our val is their validation (the card says so)
    assert set(meta["splits"]) == {"train", "val", "test"} and set(ds) == {"train", "validation", "test"}
    assert "`val` is `validation`" in (out / "README.md").read_text()
    for split, n in meta["splits"].items():
        rows = list(ds["validation" if split == "val" else split])
        index = {r["key"]: r for r in _index(out, split)}
        assert len(rows) == n and {r["__key__"] for r in rows} == set(index)
        feats = ds["validation" if split == "val" else split].features
        assert feats["cls"].names == meta["classes"]
        for r in rows:
            rec = index[r["__key__"]]
            assert r["cls"] == rec["label_index"] and feats["cls"].int2str(r["cls"]) == rec["label"]
            assert np.asarray(r["spec.npy"]).shape == tuple(meta["spec_shape"])
            frames = [r[f"f{i:03d}.jpg"] for i in range(meta["max_frames"])]
            assert sum(f is not None for f in frames) == rec["n_frames"]
            assert frames[0].size[1] == 32 or frames[0].size[0] == 32
            assert r["json"]["key"] == r["__key__"]


def test_wids_reads_the_index(out):
    wids = pytest.importorskip("wids")
    meta = json.loads((out / "dataset.json").read_text())
    ds = wids.ShardListDataset(str(out / "train.wids.json"))
    index = _index(out, "train")
    assert len(ds) == meta["splits"]["train"] == len(index)
    for i in (0, len(ds) - 1):
        s = ds[i]
        assert s["__key__"] == index[i]["key"] and int(s[".cls"]) == index[i]["label_index"]
        assert np.asarray(s[".spec.npy"]).shape == tuple(meta["spec_shape"])


def test_webdataset_reads_the_shards(out):
    wds = pytest.importorskip("webdataset")
    meta = json.loads((out / "dataset.json").read_text())
    urls = [str(out / e["name"]) for e in json.loads((out / "train.manifest.json").read_text())["shards"]]
    rows = list(wds.WebDataset(urls, shardshuffle=False))
    assert [r["__key__"] for r in rows] == [r["key"] for r in _index(out, "train")]
    spec = np.load(io.BytesIO(rows[0]["spec.npy"]), allow_pickle=False)
    assert spec.shape == tuple(meta["spec_shape"])


def test_hugging_face_webdataset_builder_with_the_card_features(out, tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.load_dataset_builder(str(out), cache_dir=str(tmp_path)).info.features
    ds = datasets.load_dataset("webdataset", data_files={"train": str(out / "train-*.tar")}, split="train",
                               features=features, cache_dir=str(tmp_path))
    assert len(ds) == json.loads((out / "dataset.json").read_text())["splits"]["train"]


def test_webdataset_pipe_from_s3(out, s3_server):
    wds = pytest.importorskip("webdataset")
    import sys

    from avprep.upload import upload_folder
    bucket = s3_server.new_bucket()
    upload_folder(out, f"s3://{bucket}/d", s3_endpoint=s3_server.endpoint)
    # the same as `pipe:aws s3 cp s3://.../train-000000.tar -`, with boto3 (no aws CLI needed here)
    cat = (f"{sys.executable} -c \"import boto3,shutil,sys; b=boto3.client('s3',endpoint_url='{s3_server.endpoint}')"
           f".get_object(Bucket='{bucket}',Key='d/train-000000.tar')['Body']; "
           "shutil.copyfileobj(b,sys.stdout.buffer)\"")
    rows = list(wds.WebDataset(f"pipe:{cat}", shardshuffle=False))
    first = json.loads((out / "train.manifest.json").read_text())["shards"][0]
    assert len(rows) == first["num_samples"] and rows[0]["__key__"] == _index(out, "train")[0]["key"]
