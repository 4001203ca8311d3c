"""The methods of issue 22 in real training runs, one table row per method: every fusion each
allows (the others refused before training), ``--resume`` bit-exact with the method's state, and
2-rank DDP (gloo, torchrun) keeping parameters bitwise equal; after each run the method's own
trace is checked (``_check_run``). Shards as in test_train.py (real synthetic CREMA-D). LFM and UMT
(teachers, extra heads) have their own modules."""
from __future__ import annotations

import json
import math
import os
import subprocess
from dataclasses import dataclass, field

import pytest
import torch

from ogmge_train import modulation, names
from ogmge_train import train as train_mod
from ogmge_train.config import BB_METHOD_SETTINGS, PRESETS, resolve
from ogmge_train.errors import ConfigError
from tests._helpers import REPO, read_jsonl, strip_wall_time, torchrun

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass(frozen=True)
class Case:
    """How one method is exercised: ``settings`` make it act within ``epochs`` epochs; ``resume``
    and ``ddp`` name the fusion each of those tests runs it with (spread over the fusions)."""
    resume: str
    ddp: str
    settings: dict = field(default_factory=dict)
    epochs: int = 2
    ddp_slow: bool = False


CASES = {
    "relearning": Case("concat", "concat", {"relearn_every": 1, "relearn_times": 1, "relearn_holdout": 0.3},
                       epochs=3),
    "inforeg": Case("film", "sum"),
    "cml": Case("sum", "gated", {"cml_lambda": 0.5}, ddp_slow=True),
    "mbsd": Case("gated", "film", ddp_slow=True),
    "mla": Case("concat", "concat"),
    "reconboost": Case("concat", "concat"),
    "mmcosine": Case("sum", "concat"),
    "ume": Case("concat", "concat"),
    "amco": Case("sum", "concat"),
    "greedy": Case("sum", "sum", {"greedy_eps": 0.0, "greedy_window": 2}),
    "amss": Case("gated", "concat"),
    "amss-plus": Case("gated", "concat"),
    "valuation-sample": Case("gated", "concat"),
    "valuation-modality": Case("gated", "concat", {"valuation_part_ratio": 0.5}),
}


@pytest.fixture(scope="module")
def shards(train_shards):
    return train_shards()


@pytest.fixture(scope="module")
def small_shards(train_shards):
    return train_shards(shard_size=3)


def tiny_config(shards, out, method, **kw):
    kw = {"epochs": CASES[method].epochs, "batch_size": 8, "image_size": 32, "workers": 0, "device": "cpu",
          "optimizer": "sgd", "lr": 0.05, "modulation": method, **CASES[method].settings, **kw}
    return resolve("demo", shards=str(shards), out=str(out), **kw)


def ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _equal(a, b) -> bool:
    """Exact equality of nested method state (tensors bitwise)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and \
            torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _check_run(method, steps, saved, record):
    """What each method must leave in steps.jsonl and its checkpoint state after a short run."""
    assert math.isfinite(record["train"]["loss"])
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


def _check_folder(method, run):
    _check_run(method, read_jsonl(run / "steps.jsonl"), ckpt(run / "last.pt")["method"],
               read_jsonl(run / "metrics.jsonl")[-1])


def test_registered_with_a_description_and_the_fusions_their_classes_allow():
    assert set(CASES) <= set(names.METHODS) and set(names.METHOD_HELP) == set(names.METHODS)
    assert all(len(names.METHOD_HELP[m]) < 120 for m in names.METHODS)
    for method, case in CASES.items():
        cls = modulation.METHODS[method]
        assert names.METHOD_FUSIONS.get(method) == cls.fusions
        assert {case.resume, case.ddp} <= set(cls.fusions or names.FUSIONS)


@pytest.mark.parametrize("fusion", names.FUSIONS)
@pytest.mark.parametrize("method", list(CASES))
def test_trains_with_every_fusion_it_allows(shards, tmp_path, method, fusion):
    allowed = names.METHOD_FUSIONS.get(method, names.FUSIONS)
    if fusion not in allowed:
        with pytest.raises(ConfigError, match=f"--modulation {method} works with --fusion"):
            tiny_config(shards, tmp_path / "run", method, fusion=fusion)
        return
    train_mod.train(tiny_config(shards, tmp_path / "run", method, fusion=fusion))
    _check_folder(method, tmp_path / "run")


class Crash(Exception):
    pass


@pytest.mark.parametrize("method", list(CASES))
def test_resume_is_bit_exact(shards, tmp_path, method):
    """Killed at the second step of the last epoch and resumed: every line, parameter and the
    method's own state equal an uninterrupted run's (the state crosses the epoch boundary where
    each method first acts: masks, traces, consolidation, re-initialisation)."""
    kw = dict(fusion=CASES[method].resume)
    last = CASES[method].epochs - 1
    full, part = tmp_path / "full", tmp_path / "part"
    train_mod.train(tiny_config(shards, full, method, **kw))

    def crash_in_last_epoch(e):
        if e["event"] == "step" and e["epoch"] == last and e["step"] == 2:
            raise Crash

    with pytest.raises(Crash):
        train_mod.train(tiny_config(shards, part, method, **kw), on_event=crash_in_last_epoch)
    assert ckpt(part / "last.pt")["epoch"] == last - 1
    train_mod.train(tiny_config(shards, part, method, **kw), resume=True)
    assert strip_wall_time(read_jsonl(part / "metrics.jsonl")) == strip_wall_time(read_jsonl(full / "metrics.jsonl"))
    assert (part / "steps.jsonl").read_bytes() == (full / "steps.jsonl").read_bytes()
    a, b = ckpt(part / "last.pt"), ckpt(full / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert _equal(a["method"], b["method"])


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if c.ddp_slow else m
                                    for m, c in CASES.items()])
def test_ddp_two_ranks_keep_parameters_bitwise_equal(small_shards, tmp_path, method):
    case = CASES[method]
    out, hashes = tmp_path / "run", tmp_path / "hashes"
    hashes.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    settings = [f"{k}={json.dumps(v)}" for k, v in {**case.settings, "epochs": case.epochs}.items()]
    cmd = [*torchrun(), "--standalone", "--nproc-per-node", "2", str(REPO / "tests" / "ddp_worker.py"),
           str(small_shards), str(out), str(hashes), method, case.ddp, *settings]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rank0, rank1 = read_jsonl(hashes / "rank0.jsonl"), read_jsonl(hashes / "rank1.jsonl")
    assert rank0 == rank1 and len(rank0) == case.epochs and rank0[-2]["sha256"] != rank0[-1]["sha256"]
    model, _, _ = train_mod.load_run(out, "last")
    assert train_mod._param_hash(model) == rank0[-1]["sha256"]
    _check_folder(method, out)
    if method == "relearning":                 # the gathered diagnosis re-initialised both ranks alike
        last = read_jsonl(out / "steps.jsonl")[-1]
        assert last["relearn_w_a"] + last["relearn_w_v"] > 0


def test_bb_presets_carry_the_benchmarks_recipe_and_method_settings():
    """BalanceBenchmark's global recipe, then its per-method settings, then explicit flags."""
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
