"""Issue 22's second set of methods (amco, ...) in real training runs: every fusion each allows (the
others refused before training), ``--resume`` bit-exact with the method's state, and 2-rank DDP
(gloo, torchrun) keeping parameters bitwise equal. Shards as in test_train.py (synthetic CREMA-D)."""
from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
import torch

from ogmge_train import modulation, names
from ogmge_train import train as train_mod
from ogmge_train.config import resolve
from ogmge_train.errors import ConfigError
from tests._helpers import REPO, read_jsonl, torchrun

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# settings that make each method act within a 2-3 epoch run
SETTINGS: dict[str, dict] = {
    "amco": {},
    "greedy": {"greedy_eps": 0.0, "greedy_window": 2},
    "amss": {},
    "amss-plus": {},
    "valuation-sample": {},
    "valuation-modality": {"valuation_part_ratio": 0.5},
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


def test_registered_with_the_fusions_their_classes_allow():
    for method in SETTINGS:
        cls = modulation.METHODS[method]
        assert method in names.METHODS and names.METHOD_FUSIONS.get(method) == cls.fusions
    assert set(names.METHOD_HELP) == set(names.METHODS) and all(len(h) < 120 for h in names.METHOD_HELP.values())


def _check_run(method, steps, saved, record):
    assert math.isfinite(record["train"]["loss"])
    if method == "amco":                       # masks from the second epoch on; the star layer is saved
        assert {s["amco_p"] for s in steps if s["epoch"] == 0} == {0.0}
        assert max(s["amco_p"] for s in steps if s["epoch"] == 1) == 1.0
        assert all(s["amco_dep_a"] + s["amco_dep_v"] >= 0 for s in steps)
        assert set(saved) == {"level", "dependent"}
    if method == "greedy":                     # windows of 2 steps after each measurement (eps 0)
        cur = [s["greedy_cur_a"] + s["greedy_cur_v"] for s in steps]
        assert cur[:3] == [0.0, 1.0, 1.0] and set(cur) == {0.0, 1.0}
        assert saved["speeds"].shape == (4,) and bool((saved["speeds"] > 0).all())
    if method in ("amss", "amss-plus"):       # keep shares of every step, summing to 1 (clamps are symmetric)
        assert all(0.1 <= s["amss_keep_a"] <= 0.9 and abs(s["amss_keep_a"] + s["amss_keep_v"] - 1) < 1e-9
                   for s in steps)
        assert saved == {}
    if method.startswith("valuation"):         # every step: the epoch's mean Shapley values, its copies
        assert all(-0.5 <= s["phi_a"] <= 1.5 and -0.5 <= s["phi_v"] <= 1.5 and s["copies"] >= 0 for s in steps)
        assert sum(s["copies"] for s in steps) > 0 and saved == {}


@pytest.mark.parametrize("fusion", names.FUSIONS)
@pytest.mark.parametrize("method", list(SETTINGS))
def test_trains_with_every_fusion_it_allows(shards, tmp_path, method, fusion):
    allowed = names.METHOD_FUSIONS.get(method, names.FUSIONS)
    if fusion not in allowed:
        with pytest.raises(ConfigError, match=f"--modulation {method} works with --fusion"):
            tiny_config(shards, tmp_path / "run", method, fusion=fusion)
        return
    train_mod.train(tiny_config(shards, tmp_path / "run", method, fusion=fusion))
    run = tmp_path / "run"
    _check_run(method, read_jsonl(run / "steps.jsonl"), ckpt(run / "last.pt")["method"],
               read_jsonl(run / "metrics.jsonl")[-1])


class Crash(Exception):
    pass


@pytest.mark.parametrize("method", list(SETTINGS))
def test_resume_is_bit_exact(shards, tmp_path, method):
    fusion = (names.METHOD_FUSIONS.get(method) or names.FUSIONS)[-1]
    kw = dict(epochs=3, fusion=fusion)
    full, part = tmp_path / "full", tmp_path / "part"
    train_mod.train(tiny_config(shards, full, method, **kw))

    def crash_in_epoch_2(e):
        if e["event"] == "step" and e["epoch"] == 2 and e["step"] == 2:
            raise Crash

    with pytest.raises(Crash):
        train_mod.train(tiny_config(shards, part, method, **kw), on_event=crash_in_epoch_2)
    assert ckpt(part / "last.pt")["epoch"] == 1
    train_mod.train(tiny_config(shards, part, method, **kw), resume=True)

    def strip(lines):
        return [{k: v for k, v in r.items() if k not in WALL_TIME} for r in lines]
    assert strip(read_jsonl(part / "metrics.jsonl")) == strip(read_jsonl(full / "metrics.jsonl"))
    assert (part / "steps.jsonl").read_bytes() == (full / "steps.jsonl").read_bytes()
    a, b = ckpt(part / "last.pt"), ckpt(full / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert json.dumps(a["method"], default=str) == json.dumps(b["method"], default=str)


@pytest.fixture(scope="module")
def small_shards(train_shards):
    return train_shards(shard_size=3)


@pytest.mark.parametrize("method", list(SETTINGS))
def test_ddp_two_ranks_keep_parameters_bitwise_equal(small_shards, tmp_path, method):
    fusion = (names.METHOD_FUSIONS.get(method) or names.FUSIONS)[0]
    out, hashes = tmp_path / "run", tmp_path / "hashes"
    hashes.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    settings = [f"{k}={json.dumps(v)}" for k, v in SETTINGS[method].items()]
    cmd = [*torchrun(), "--standalone", "--nproc-per-node", "2", str(REPO / "tests" / "ddp_worker.py"),
           str(small_shards), str(out), str(hashes), method, fusion, *settings]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rank0, rank1 = read_jsonl(hashes / "rank0.jsonl"), read_jsonl(hashes / "rank1.jsonl")
    assert rank0 == rank1 and len(rank0) == 2 and rank0[0]["sha256"] != rank0[1]["sha256"]
    model, _, _ = train_mod.load_run(out, "last")
    assert train_mod._param_hash(model) == rank0[-1]["sha256"]
    _check_run(method, read_jsonl(out / "steps.jsonl"), ckpt(out / "last.pt")["method"],
               read_jsonl(out / "metrics.jsonl")[-1])
