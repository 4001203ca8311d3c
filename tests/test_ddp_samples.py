"""3 DDP ranks (gloo on CPU, real torchrun) over a split with a single train shard: samples, not
shards, are partitioned, so this trains (it was refused when shards were the unit); parameters
stay bitwise identical across ranks and the recorded eval metrics equal a single-process evaluate."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from ogmge_train import train as train_mod
from tests.test_ddp import REPO, torchrun
from tests.test_train import make_shards, read_jsonl


@pytest.mark.slow
def test_three_ranks_one_train_shard(tmp_path):
    shards = make_shards(tmp_path / "s", clips=40, shard_size=1000)
    info = json.loads((shards / "dataset.json").read_text())
    assert len(json.loads((shards / "train.manifest.json").read_text())["shards"]) == 1
    out, hashes = tmp_path / "run", tmp_path / "hashes"
    hashes.mkdir()
    env = {**os.environ, "OGMGE_PARAM_HASH_DIR": str(hashes), "OMP_NUM_THREADS": "1"}
    cmd = [*torchrun(), "--standalone", "--nproc-per-node", "3", "-m", "ogmge_train",
           "--preset", "demo", "--shards", str(shards), "--out", str(out), "--epochs", "2",
           "--batch-size", "2", "--image-size", "32", "--device", "cpu", "--workers", "2",
           "--modulation", "ogm-ge", "--optimizer", "sgd", "--lr", "0.05", "--json"]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    ranks = [read_jsonl(hashes / f"rank{i}.jsonl") for i in range(3)]
    assert ranks[0] == ranks[1] == ranks[2] and len(ranks[0]) == 2
    assert len(read_jsonl(out / "steps.jsonl")) == 2 * (info["splits"]["train"] // (2 * 3))
    record = read_jsonl(out / "metrics.jsonl")[-1]
    for split in ("val", "test"):
        single = train_mod.evaluate(out, split=split, which="last", device="cpu", workers=0)
        assert single == pytest.approx(record[split], abs=1e-5)
