"""AVE event localisation end to end (README: Localisation on AVE): segment labels from the
annotations into each sample's json (``avprep.shardformat.segments``), older shards read from
``event``, verify's checks, the loader's ``segments``, and AVGA / PSP trained on segments (resume
bit-exact, 2 gloo ranks bitwise equal)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from avprep import shardformat as sf
from avprep.datasets import ave
from ogmge_train import data
from ogmge_train import train as train_mod
from ogmge_train.config import resolve
from ogmge_train.localisation import segment_accuracy
from tests._helpers import REPO, read_jsonl, torchrun

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def samples_json(shards, split="train"):
    out = []
    for tar in sorted(shards.glob(f"{split}-*.tar")):
        with open(tar, "rb") as f:
            for s in sf.read_shard_samples(f, str(tar)):
                out.append(json.loads(bytes(s.members[sf.JSON])))
    return out


def test_segment_labels_rule():
    assert sf.segment_labels([2, 5], 7, 10) == [-1, -1, 7, 7, 7, -1, -1, -1, -1, -1]    # t in [start, end)
    assert sf.segment_labels([0, 10], 1, 10) == [1] * 10
    assert sf.segment_labels([1.4, 2.6], 0, 4) == [-1, 0, 0, -1]         # the segment's middle decides
    assert sf.count_segments(10.0) == 10 and sf.count_segments(9.9999999) == 10 and sf.count_segments(0.4) == 1


def test_every_sample_carries_its_segments_from_the_annotations(ave_shards):
    raw = ave_shards.parent / "raw"
    rows = {r[2]: r for r in ave.read_annotations(raw / "Annotations.txt")}
    metas = [m for split in ("train", "val", "test") for m in samples_json(ave_shards, split)]
    assert metas and all(len(m["segments"]) == 4 for m in metas)
    events = 0
    for m in metas:
        vid = m["source"].removeprefix("AVE/").removesuffix(".mp4")
        _, cat, _, _, start, end = rows[vid]
        want = [m["label_index"] if start <= t < end else -1 for t in range(4)]
        assert m["segments"] == want and m["event"] == [start, end] and m["label"] == cat
        events += sum(x >= 0 for x in want)
    assert 0 < events < 4 * len(metas)                   # events and background both present


def test_older_shards_without_segments_read_from_the_event():
    meta = {"event": [1, 3], "label_index": 2, "duration": 4.0}
    assert sf.parse_segments(meta, 4) == [-1, 2, 2, -1]
    assert sf.parse_segments({"label_index": 1}, 4) is None           # not an AVE sample
    for bad in ({"segments": [0, 5]}, {"segments": "0,1"}, {"segments": [0, True]}, {"segments": [-2]},
                {"event": [1], "label_index": 2, "duration": 4.0}):
        with pytest.raises(sf.ShardDataError):
            sf.parse_segments(bad, 4)


def test_loader_gives_segments_and_refuses_samples_without(ave_shards, train_shards):
    batch = next(iter(data.make_loader(ave_shards, "train", train=False, batch_size=4, frames=4, image_size=32,
                                       workers=0, segments=True)))
    metas = samples_json(ave_shards)
    by_key = {m["key"]: m["segments"] for m in metas}
    assert batch["segments"].shape == (4, 4) and batch["segments"].dtype == torch.int64
    assert batch["segments"].tolist() == [by_key[k] for k in batch["key"]]
    assert batch["visual"].shape[1] == 4                     # one frame per 1 s segment
    bad = []
    loader = data.make_loader(train_shards(), "test", train=False, batch_size=4, frames=1, image_size=32, workers=0,
                              segments=True, max_bad_samples=1000, on_bad_sample=lambda *a: bad.append(a))
    assert all(b["segments"].shape[0] == 0 for b in loader)
    assert bad and "no segment labels" in bad[0][2]


def test_verify_reports_bad_segment_labels(ave_shards, tmp_path):
    import shutil

    from avprep.verify import verify
    copy = tmp_path / "shards"
    shutil.copytree(ave_shards, copy)
    assert verify(copy).ok
    tar = sorted(copy.glob("train-*.tar"))[0]
    data_ = tar.read_bytes()
    first = samples_json(copy)[0]
    old = json.dumps(first["segments"], separators=(",", ":")).encode()
    new = old.replace(b"-1", b"99", 1) if b"-1" in old else old.replace(b"[", b"[9", 1)
    assert len(new) == len(old) and data_.count(old) >= 1
    tar.write_bytes(data_.replace(old, new, 1))
    report = verify(copy)
    assert not report.ok
    assert any("segments" in str(p) for p in report.problems)


def loc_config(shards, out, **kw):
    kw = {"epochs": 2, "batch_size": 4, "image_size": 32, "workers": 0, "device": "cpu", "frames": 4,
          "task": "localisation", "optimizer": "sgd", "lr": 0.05, **kw}
    return resolve("demo", shards=str(shards), out=str(out), **kw)


class Crash(Exception):
    pass


@pytest.mark.parametrize("model", ["avga", "psp"])
def test_localisation_trains_and_resumes_bit_exactly(ave_shards, tmp_path, model):
    full, part = tmp_path / "full", tmp_path / "part"
    summary = train_mod.train(loc_config(ave_shards, full, model=model, epochs=3))

    def crash(e):
        if e["event"] == "step" and e["epoch"] == 2 and e["step"] == 2:
            raise Crash
    with pytest.raises(Crash):
        train_mod.train(loc_config(ave_shards, part, model=model, epochs=3), on_event=crash)
    train_mod.train(loc_config(ave_shards, part, model=model, epochs=3), resume=True)
    assert (part / "steps.jsonl").read_bytes() == (full / "steps.jsonl").read_bytes()
    a = torch.load(part / "last.pt", weights_only=True)["model"]
    b = torch.load(full / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)
    # the recorded test accuracy is the segment accuracy of the selected checkpoint
    m, cfg, _ = train_mod.load_run(full, "best")
    loader = data.make_loader(ave_shards, "test", train=False, batch_size=4, frames=4, image_size=32, workers=0,
                              segments=True)
    logits, labels = [], []
    with torch.no_grad():
        for batch in loader:
            logits.append(m(batch["audio"], batch["visual"]).logits.view(len(batch["key"]), 4, -1))
            seg = batch["segments"]
            labels.append(torch.where(seg < 0, torch.full_like(seg, 4), seg))
    assert summary["test"]["acc"] == pytest.approx(segment_accuracy(torch.cat(logits), torch.cat(labels)))
    steps = read_jsonl(full / "steps.jsonl")
    assert any(min(s["k_a"], s["k_v"]) < 1.0 for s in steps)


def test_localisation_refuses_frames_that_are_not_one_per_segment(ave_shards, tmp_path):
    from ogmge_train.errors import ConfigError

    with pytest.raises(ConfigError, match="--frames 4"):
        train_mod.train(loc_config(ave_shards, tmp_path / "run", model="avga", frames=3, epochs=1))


@pytest.mark.parametrize("model", ["avga", "psp"])
def test_localisation_ddp_keeps_ranks_bitwise_equal(ave_shards, tmp_path, model):
    out, hashes = tmp_path / "run", tmp_path / "hashes"
    hashes.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    extra = [f"{k}={json.dumps(v)}" for k, v in {"model": model, "task": "localisation", "frames": 4}.items()]
    cmd = [*torchrun(), "--standalone", "--nproc-per-node", "2", str(REPO / "tests" / "ddp_worker.py"),
           str(ave_shards), str(out), str(hashes), "ogm-ge", "concat", *extra]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rank0, rank1 = read_jsonl(hashes / "rank0.jsonl"), read_jsonl(hashes / "rank1.jsonl")
    assert rank0 == rank1 and len(rank0) == 2 and rank0[0]["sha256"] != rank0[1]["sha256"]
    record = read_jsonl(out / "metrics.jsonl")[-1]
    single = train_mod.evaluate(out, split="test", which="last", device="cpu", workers=0)
    # every segment evaluated exactly once over the ranks; the mean-substituted unimodal scores of
    # an untrained model have near-ties whose order (and so mAP) moves with batch composition
    exact = {k: v for k, v in single.items() if k not in ("map_a", "map_v")}
    assert exact == pytest.approx({k: record["test"][k] for k in exact}, abs=1e-5)
    assert single["map_a"] == pytest.approx(record["test"]["map_a"], abs=0.02)
