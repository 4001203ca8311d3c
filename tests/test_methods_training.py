"""The methods of issue 22 in real training runs: every fusion each allows (the others refused
before training), ``--resume`` bit-exact with the method's state, and 2-rank DDP (gloo, torchrun)
keeping parameters bitwise equal. Shards as in test_train.py (real synthetic CREMA-D)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from ogmge_train import names
from ogmge_train import train as train_mod
from ogmge_train.config import resolve
from ogmge_train.errors import ConfigError
from tests._helpers import REPO, read_jsonl, torchrun

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# settings that make each method act within a 2-3 epoch run
SETTINGS = {
    "relearning": {"relearn_every": 1, "relearn_times": 1, "relearn_holdout": 0.3},
    "inforeg": {},
    "cml": {"cml_lambda": 0.5},
    "mbsd": {},
    "mla": {},
    "reconboost": {},
    "mmcosine": {},
    "ume": {},
}
WALL_TIME = {"time_s", "samples_per_s"}


@pytest.fixture(scope="module")
def shards(train_shards):
    return train_shards()


def tiny_config(shards, out, method, **kw):
    kw = {"epochs": 2, "batch_size": 8, "image_size": 32, "workers": 0, "device": "cpu", "optimizer": "sgd",
          "lr": 0.05, "modulation": method, **SETTINGS[method], **kw}
    return resolve("demo", shards=str(shards), out=str(out), **kw)


def ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_every_new_method_is_registered_with_a_description():
    assert set(SETTINGS) <= set(names.METHODS) and set(names.METHOD_HELP) == set(names.METHODS)
    assert all(len(names.METHOD_HELP[m]) < 120 for m in names.METHODS)


@pytest.mark.parametrize("fusion", names.FUSIONS)
@pytest.mark.parametrize("method", list(SETTINGS))
def test_trains_with_every_fusion_it_allows(shards, tmp_path, method, fusion):
    allowed = names.METHOD_FUSIONS.get(method, names.FUSIONS)
    if fusion not in allowed:
        with pytest.raises(ConfigError, match=f"--modulation {method} works with --fusion"):
            tiny_config(shards, tmp_path / "run", method, fusion=fusion)
        return
    train_mod.train(tiny_config(shards, tmp_path / "run", method, fusion=fusion, epochs=3 if method == "relearning"
                                else 2))
    steps = read_jsonl(tmp_path / "run" / "steps.jsonl")
    saved = ckpt(tmp_path / "run" / "last.pt")["method"]
    if method == "relearning":                 # re-initialised before epoch 2, theta0 dropped after it
        assert {s["relearn_w_a"] for s in steps if s["epoch"] < 2} == {0.0} and "init" not in saved
        assert saved["weights"].tolist() == [steps[-1]["relearn_w_a"], steps[-1]["relearn_w_v"]]
    if method == "inforeg":                    # one epoch trace recorded, the regulated modality's beta > 0
        assert len(saved["traces"]) == 1 and saved["running"] > 0
        assert all(max(s["beta_a"], s["beta_v"]) > 0 for s in steps)
    if method == "cml":
        assert {s["cml_removed"] for s in steps} <= {0.0, 1.0}
    if method == "mbsd":
        assert any(s["mbsd_rs"] > 0 for s in steps)
    if method == "mla":                        # two rounds (updates) per step, the projection in the state
        assert int(saved["rounds"]) == 2 * len(steps) and saved["P"].shape == (128, 128)
    if method == "mmcosine":                   # rho from the cosine logits (scale 15: far from the head's own)
        assert all(s["k_a"] == s["k_v"] == 1.0 for s in steps)
    if method == "reconboost":                 # boosting terms, the consolidation term from the second epoch
        assert all(s["recon_boost_a"] > 0 and s["recon_boost_v"] > 0 for s in steps)
        assert {s["recon_ga_a"] > 0 for s in steps} == {False, True} and steps[-1]["recon_rate"] != 1.0


def _strip(lines):
    return [{k: v for k, v in r.items() if k not in WALL_TIME} for r in lines]


class Crash(Exception):
    pass


@pytest.mark.parametrize("method,fusion", [("relearning", "concat"), ("inforeg", "film"), ("cml", "sum"),
                                           ("mbsd", "gated"), ("mla", "concat"),
                                           ("reconboost", "concat"), ("mmcosine", "sum"),
                                           ("ume", "concat")])
def test_resume_is_bit_exact(shards, tmp_path, method, fusion):
    full, part = tmp_path / "full", tmp_path / "part"
    train_mod.train(tiny_config(shards, full, method, fusion=fusion, epochs=3))

    def crash_in_epoch_2(e):
        if e["event"] == "step" and e["epoch"] == 2 and e["step"] == 2:
            raise Crash

    with pytest.raises(Crash):
        train_mod.train(tiny_config(shards, part, method, fusion=fusion, epochs=3), on_event=crash_in_epoch_2)
    assert ckpt(part / "last.pt")["epoch"] == 1
    train_mod.train(tiny_config(shards, part, method, fusion=fusion, epochs=3), resume=True)
    assert _strip(read_jsonl(part / "metrics.jsonl")) == _strip(read_jsonl(full / "metrics.jsonl"))
    assert (part / "steps.jsonl").read_bytes() == (full / "steps.jsonl").read_bytes()
    a, b = ckpt(part / "last.pt"), ckpt(full / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])


@pytest.mark.parametrize("method,fusion", [
    ("relearning", "concat"), ("inforeg", "sum"), ("mla", "concat"), ("reconboost", "concat"),
    ("mmcosine", "concat"), ("ume", "concat"),
    pytest.param("cml", "gated", marks=pytest.mark.slow), pytest.param("mbsd", "film", marks=pytest.mark.slow)])
def test_ddp_keeps_parameters_identical(train_shards, tmp_path, method, fusion):
    shards = train_shards(shard_size=3)
    out, hashes = tmp_path / "run", tmp_path / "hashes"
    hashes.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    settings = [f"{k}={json.dumps(v)}" for k, v in SETTINGS[method].items()]
    cmd = [*torchrun(), "--standalone", "--nproc-per-node", "2", str(REPO / "tests" / "ddp_worker.py"),
           str(shards), str(out), str(hashes), method, fusion, "epochs=3", *settings]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rank0, rank1 = read_jsonl(hashes / "rank0.jsonl"), read_jsonl(hashes / "rank1.jsonl")
    assert rank0 == rank1 and len(rank0) == 3 and rank0[1]["sha256"] != rank0[2]["sha256"]
    steps = read_jsonl(out / "steps.jsonl")
    if method == "relearning":                 # the gathered diagnosis gave both ranks the same weights
        assert steps[-1]["relearn_w_a"] + steps[-1]["relearn_w_v"] > 0


def test_bb_presets_carry_the_benchmarks_recipe_and_method_settings():
    """BalanceBenchmark's global recipe, then its per-method settings, then explicit flags."""
    from ogmge_train.config import BB_METHOD_SETTINGS, PRESETS
    assert {"bb-cremad", "bb-ks", "bb-vggsound"} <= set(PRESETS)
    c = resolve("bb-cremad", shards="s", out="o", modulation="relearning")
    assert (c.optimizer, c.lr, c.weight_decay, c.batch_size, c.epochs, c.lr_step, c.lr_gamma, c.frames) == \
        ("adamw", 1e-3, 0.01, 32, 30, 10, 0.1, 2)
    assert (c.relearn_lambda, c.relearn_every, c.relearn_times) == (3.0, 15, 2)
    c = resolve("bb-ks", shards="s", out="o", modulation="ogm", alpha=0.5)
    assert (c.frames, c.alpha, c.modulation_start, c.modulation_end) == (3, 0.5, 10, 80)   # the flag wins
    assert resolve("bb-ks", shards="s", out="o", modulation="pmr").pmr_momentum == 0.5
    assert resolve("demo", shards="s", out="o", modulation="pmr").pmr_momentum == 0.2      # only under bb-*
    assert set(BB_METHOD_SETTINGS) <= set(names.METHODS)
