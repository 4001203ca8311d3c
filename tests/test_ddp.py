"""A real 2-process DDP run (gloo on CPU) launched the way users launch it: torchrun -m ogmge_train.

Parameter hashes reach the test through ``train(on_epoch_end=...)`` in tests/ddp_worker.py.
What must hold (SPEC §5): with OGM-GE every rank uses the same k (all-reduced batch scores) and
the same GE noise, so parameters stay bitwise identical across ranks; evaluation gathers every
rank's predictions, so the recorded metrics equal a single-process evaluation of the same model.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from ogmge_train import train as train_mod
from tests._helpers import REPO, read_jsonl, torchrun


@pytest.fixture(scope="module")
def small_shards(train_shards):
    # 3 samples per shard: the test split spans 2 shards, so both ranks evaluate part of it,
    # and val has a single shard, so one rank evaluates nothing (the empty-rank path).
    return train_shards(shard_size=3)


@pytest.mark.parametrize("modulation,fusion", [
    ("ogm-ge", "concat"), ("pmr", "gated"), ("mmpareto", "sum"), ("gradient-blending", "concat"),
    pytest.param("opm-ge", "sum", marks=pytest.mark.slow), pytest.param("agm", "gated", marks=pytest.mark.slow),
    pytest.param("modality-drop", "film", marks=pytest.mark.slow)])
def test_ddp_parameters_identical_and_metrics_cover_every_sample(small_shards, tmp_path, modulation, fusion):
    """Parameter hashes come from ``train(on_epoch_end=...)`` on every rank (tests/ddp_worker.py)."""
    out, hashes = tmp_path / "run", tmp_path / "hashes"
    hashes.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [*torchrun(), "--standalone", "--nproc-per-node", "2", str(REPO / "tests" / "ddp_worker.py"),
           str(small_shards), str(out), str(hashes), modulation, fusion]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr

    # bitwise identical parameters on both ranks after every epoch, and they did change
    rank0, rank1 = read_jsonl(hashes / "rank0.jsonl"), read_jsonl(hashes / "rank1.jsonl")
    assert rank0 == rank1 and len(rank0) == 2
    assert rank0[0]["sha256"] != rank0[1]["sha256"]
    model, _, _ = train_mod.load_run(out, "last")
    assert train_mod._param_hash(model) == rank0[-1]["sha256"]      # what rank 0 saved

    steps = read_jsonl(out / "steps.jsonl")
    info = json.loads((small_shards / "dataset.json").read_text())
    assert len(steps) == 2 * (info["splits"]["train"] // (4 * 2))
    if modulation == "ogm-ge":   # active: the dominant modality was slowed in every step
        assert all(min(s["k_a"], s["k_v"]) < 1.0 for s in steps)
    if modulation == "gradient-blending":      # re-estimated every epoch, the same on both ranks
        assert steps[0]["gb_f"] != steps[-1]["gb_f"]
    if modulation == "opm-ge":
        assert all(max(s["q_a"], s["q_v"]) > 0 for s in steps)

    # metrics gathered over ranks == one process evaluating every sample of the split
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and json.loads(r.stdout.strip().splitlines()[-1]) == summary
    record = read_jsonl(out / "metrics.jsonl")[-1]
    for split in ("val", "test"):
        single = train_mod.evaluate(out, split=split, which="last", device="cpu", workers=0)
        assert single == pytest.approx(record[split], abs=1e-5)


@pytest.mark.parametrize("entry", ["-m ogmge_train", "$(which ogmge-train)"])
def test_torchrun_entry_points(small_shards, tmp_path, entry):
    """``torchrun -m ogmge_train`` and ``torchrun $(which ogmge-train)`` (how users launch it)
    train on 2 gloo processes into one default run folder, made by rank 0, reported on rank 0."""
    import shutil
    import sys
    from pathlib import Path

    script = shutil.which("ogmge-train", path=str(Path(sys.executable).parent))
    if entry.startswith("$(") and script is None:
        pytest.skip("the ogmge-train console script is not installed (make install)")
    target = ["-m", "ogmge_train"] if entry.startswith("-m") else [script]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [*torchrun(), "--standalone", "--nproc-per-node", "2", *target,
           "--preset", "demo", "--shards", str(small_shards), "--epochs", "1",
           "--batch-size", "4", "--image-size", "32", "--device", "cpu", "--workers", "0", "--json"]
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout)
    assert summary["world_size"] == 2
    steps = json.loads((small_shards / "dataset.json").read_text())["splits"]["train"] // (4 * 2)
    ours = [line for line in r.stderr.splitlines() if line.startswith(("run folder: ", "training on "))]
    assert ours == ["run folder: runs/cremad-concat-ogm-ge-1", f"training on cpu x2, epochs 0..0, {steps} steps/epoch"]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["cremad-concat-ogm-ge-1"]
    assert json.loads((tmp_path / "runs" / "cremad-concat-ogm-ge-1" / "summary.json").read_text()) == summary


@pytest.mark.parametrize("settings", [
    {"model": "tsn-av"}, {"model": "tsm-av"}, {"model": "tbn"}, {"model": "psp"},
    {"model": "av", "audio_arch": "xvector"}], ids=lambda s: "-".join(s.values()))
def test_ddp_frameworks_keep_ranks_bitwise_equal(small_shards, tmp_path, settings):
    """Every model of another framework (and the x-vector encoder) trains with OGM-GE under 2 gloo
    ranks with bitwise-equal parameters after every epoch."""
    out, hashes = tmp_path / "run", tmp_path / "hashes"
    hashes.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    extra = [f"{k}={json.dumps(v)}" for k, v in {**settings, "frames": 3, "tbn_window": 8}.items()]
    cmd = [*torchrun(), "--standalone", "--nproc-per-node", "2", str(REPO / "tests" / "ddp_worker.py"),
           str(small_shards), str(out), str(hashes), "ogm-ge", "concat", *extra]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rank0, rank1 = read_jsonl(hashes / "rank0.jsonl"), read_jsonl(hashes / "rank1.jsonl")
    assert rank0 == rank1 and len(rank0) == 2 and rank0[0]["sha256"] != rank0[1]["sha256"]
    model, cfg, _ = train_mod.load_run(out, "last")
    assert cfg.model == settings["model"] and train_mod._param_hash(model) == rank0[-1]["sha256"]
    steps = read_jsonl(out / "steps.jsonl")
    assert all(min(s["k_a"], s["k_v"]) < 1.0 for s in steps)
