"""3 DDP ranks (gloo on CPU, real torchrun) over a split with a single train shard: samples, not
shards, are partitioned, so this trains (it was refused when shards were the unit); parameters
stay bitwise identical across ranks and the recorded eval metrics equal a single-process evaluate."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from ogmge_train import train as train_mod
from tests._helpers import REPO, read_jsonl, torchrun


@pytest.mark.slow
def test_three_ranks_one_train_shard(train_shards, tmp_path):
    shards = train_shards(clips=40, shard_size=1000)
    info = json.loads((shards / "dataset.json").read_text())
    assert len(json.loads((shards / "train.manifest.json").read_text())["shards"]) == 1
    out, hashes = tmp_path / "run", tmp_path / "hashes"
    hashes.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [*torchrun(), "--standalone", "--nproc-per-node", "3", str(REPO / "tests" / "ddp_worker.py"),
           str(shards), str(out), str(hashes), "ogm-ge", "concat", "batch_size=2", "workers=2"]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    ranks = [read_jsonl(hashes / f"rank{i}.jsonl") for i in range(3)]
    assert ranks[0] == ranks[1] == ranks[2] and len(ranks[0]) == 2
    assert len(read_jsonl(out / "steps.jsonl")) == 2 * (info["splits"]["train"] // (2 * 3))
    record = read_jsonl(out / "metrics.jsonl")[-1]
    for split in ("val", "test"):
        single = train_mod.evaluate(out, split=split, which="last", device="cpu", workers=0)
        assert single == pytest.approx(record[split], abs=1e-5)
