"""lfm (NeurIPS 2024): one training step against a naive float64 reference of
``2 (a_e CE(mean_u z_u) + (1 - a_e) mean_pairs A(z_u, z_w))`` with the official fitted weight, the
weight schedule, three modalities, and real runs: every fusion it allows (film/gated refused),
``--resume`` bit-exact, 2-rank DDP with parameters bitwise equal."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess

import pytest
import torch

from ogmge_train import names
from ogmge_train import train as train_mod
from ogmge_train.config import resolve
from ogmge_train.errors import ConfigError
from ogmge_train.models import build_model
from ogmge_train.modulation.lfm import LFM, fitted_weight
from ogmge_train.plugin import Balancer
from tests._helpers import REPO, av_batch, read_jsonl, torchrun
from tests.test_plugin import NAMES3, _tri, _tri_batch

B, C = 8, 5
LR = 0.1
COEF = [2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08, -5.39717505e-11]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def _naive_loss(zs, labels, a):
    """Written out per sample in Python floats (float64): CE of the mean logits and the official
    alignment (KL(m || p) + KL(m || q)) / 2 averaged over pairs."""
    n, k = len(labels), len(zs[0][0])
    ce = 0.0
    for i in range(n):
        mean = [sum(float(z[i][c]) for z in zs) / len(zs) for c in range(k)]
        ce += -math.log(_softmax(mean)[labels[i]])
    ce /= n
    pairs = [(u, w) for u in range(len(zs)) for w in range(u + 1, len(zs))]
    align = 0.0
    for u, w in pairs:
        s = 0.0
        for i in range(n):
            p, q = _softmax([float(x) for x in zs[u][i]]), _softmax([float(x) for x in zs[w][i]])
            m = [(x + y) / 2 for x, y in zip(p, q)]
            s += sum(mc * (math.log(mc) - math.log(pc)) for mc, pc in zip(m, p)) / 2
            s += sum(mc * (math.log(mc) - math.log(qc)) for mc, qc in zip(m, q)) / 2
        align += s / n
    align /= len(pairs)
    return 2 * (a * ce + (1 - a) * align), align


def test_fitted_weight_is_the_official_quintic_clamped():
    for e in (0, 1, 37, 80, 150, 199):
        assert fitted_weight(e) == pytest.approx(sum(c * e ** i for i, c in enumerate(COEF)), rel=1e-12)
    assert fitted_weight(0) == pytest.approx(0.204623704) and fitted_weight(300) == 0.05
    assert 0.9 < fitted_weight(199) < 0.95 and fitted_weight(240) == 0.05   # the fit leaves [0, 1] after 200 epochs


@pytest.mark.parametrize("fusion,epoch", [("concat", 0), ("sum", 120)])
def test_step_matches_reference(fusion, epoch):
    torch.manual_seed(0)
    model = build_model("small", fusion, C)
    plug = Balancer("lfm", model.modalities())
    twin = copy.deepcopy(model).double()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    plug.begin_epoch(epoch)
    audio, visual, labels = av_batch(B, C, 3)
    result = plug.train_step({"audio": audio, "visual": visual}, labels, opt)

    out = twin(audio.double(), visual.double())
    a = sum(c * epoch ** i for i, c in enumerate(COEF))
    want, align = _naive_loss([out.logits_a.detach(), out.logits_v.detach()], labels.tolist(), a)
    assert result.loss.item() == pytest.approx(want, rel=1e-5)
    assert result.stats["lfm_alpha"] == pytest.approx(a, rel=1e-6)
    assert result.stats["lfm_align"] == pytest.approx(align, rel=1e-4)
    # the gradient, from the same loss in torch float64 (checked equal to the naive value above)
    za, zv = out.logits_a, out.logits_v
    lp, lq = za.log_softmax(1), zv.log_softmax(1)
    m = (lp.exp() + lq.exp()) / 2
    kl = ((m * (m.log() - lp)).sum(1).mean() + (m * (m.log() - lq)).sum(1).mean()) / 2
    ce = torch.nn.functional.cross_entropy((za + zv) / 2, labels)
    loss = 2 * (a * ce + (1 - a) * kl)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    loss.backward()
    with torch.no_grad():
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            want_p = q - LR * q.grad if q.grad is not None else q
            torch.testing.assert_close(p.double(), want_p, rtol=1e-4, atol=2e-6, msg=n)


def test_three_modalities_average_the_pairs():
    _, side = _tri()
    plug = Balancer("lfm", side)
    inputs, labels = _tri_batch()
    plug.begin_epoch(3)
    out = plug.modalities.run(inputs)
    loss = plug.loss(out, labels)
    want, _ = _naive_loss([out.unimodal[u].detach().double() for u in NAMES3], labels.tolist(), fitted_weight(3))
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_refusals():
    with pytest.raises(ConfigError, match="--modulation lfm works with --fusion concat or sum, not 'gated'"):
        resolve("demo", shards="x", out="y", modulation="lfm", fusion="gated")
    with pytest.raises(ConfigError, match="--modulation lfm works with --fusion concat or sum, not 'film'"):
        Balancer("lfm", build_model("small", "film", C).modalities(), fusion="film")
    assert isinstance(Balancer("lfm", build_model("small", "sum", C).modalities()).method, LFM)
    assert names.METHOD_FUSIONS["lfm"] == ("concat", "sum")


# ------------------------------------------------------------------ real runs

def tiny(shards, out, **kw):
    kw = {"epochs": 2, "batch_size": 8, "image_size": 32, "workers": 0, "device": "cpu", "optimizer": "sgd",
          "lr": 0.05, "modulation": "lfm", **kw}
    return resolve("demo", shards=str(shards), out=str(out), **kw)


@pytest.fixture(scope="module")
def shards(train_shards):
    return train_shards()


@pytest.mark.parametrize("fusion", names.FUSIONS)
def test_trains_with_every_fusion_it_allows(shards, tmp_path, fusion):
    if fusion not in names.METHOD_FUSIONS["lfm"]:
        with pytest.raises(ConfigError, match="--modulation lfm works with --fusion concat or sum"):
            tiny(shards, tmp_path / "run", fusion=fusion)
        return
    train_mod.train(tiny(shards, tmp_path / "run", fusion=fusion))
    steps = read_jsonl(tmp_path / "run" / "steps.jsonl")
    assert {s["epoch"]: s["lfm_alpha"] for s in steps} == pytest.approx({0: fitted_weight(0), 1: fitted_weight(1)})
    assert all(s["lfm_align"] > 0 for s in steps)


class Crash(Exception):
    pass


def test_resume_is_bit_exact(shards, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train_mod.train(tiny(shards, full, fusion="sum", epochs=3))

    def crash_in_epoch_2(e):
        if e["event"] == "step" and e["epoch"] == 2 and e["step"] == 2:
            raise Crash

    with pytest.raises(Crash):
        train_mod.train(tiny(shards, part, fusion="sum", epochs=3), on_event=crash_in_epoch_2)
    train_mod.train(tiny(shards, part, fusion="sum", epochs=3), resume=True)
    drop = ("time_s", "samples_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in read_jsonl(part / "metrics.jsonl")] == \
        [{k: v for k, v in r.items() if k not in drop} for r in read_jsonl(full / "metrics.jsonl")]
    assert (part / "steps.jsonl").read_bytes() == (full / "steps.jsonl").read_bytes()
    a = torch.load(part / "last.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(full / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_ddp_keeps_parameters_identical(train_shards, tmp_path):
    shards = train_shards(shard_size=3)
    out, hashes = tmp_path / "run", tmp_path / "hashes"
    hashes.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [*torchrun(), "--standalone", "--nproc-per-node", "2", str(REPO / "tests" / "ddp_worker.py"),
           str(shards), str(out), str(hashes), "lfm", "concat", "epochs=3", f"lr={json.dumps(0.05)}"]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rank0, rank1 = read_jsonl(hashes / "rank0.jsonl"), read_jsonl(hashes / "rank1.jsonl")
    assert rank0 == rank1 and len(rank0) == 3 and rank0[1]["sha256"] != rank0[2]["sha256"]
