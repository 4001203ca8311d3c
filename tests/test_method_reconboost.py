"""reconboost (ICML 2024): one training step (boost audio, rectify, boost visual, rectify) and the
ensemble at evaluation against a naive float64 reference written from the equations."""
import copy
import math

import pytest
import torch

from ogmge_train.config import resolve
from ogmge_train.errors import ConfigError
from ogmge_train.models import build_model
from ogmge_train.plugin import Balancer
from tests._helpers import av_batch
from tests.test_plugin import _tri, _tri_batch

B, C = 8, 5
LR = 0.1

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(seed=0):
    return av_batch(B, C, seed)


def _log_softmax(row):
    """Per class z_c - log sum_k exp z_k (a tensor row keeps its graph; a list gives floats)."""
    if isinstance(row, list):
        top = max(row)
        lse = top + math.log(sum(math.exp(x - top) for x in row))
        return [x - lse for x in row]
    lse = torch.logsumexp(row, 0)
    return [row[c] - lse for c in range(len(row))]


def _boost(own, others, y, w1, w2):
    """Per sample: -w1/C log p_y + w2/C q_y log p_y (t one-hot), q = softmax(others); batch mean."""
    total = 0
    for i in range(len(y)):
        logp = _log_softmax(own[i])
        q = [math.exp(v) for v in _log_softmax(others[i].tolist())]
        total = total + (-w1 * logp[y[i]] + w2 * q[y[i]] * logp[y[i]]) / C
    return total / len(y)


def _ce(z, y):
    return sum(-_log_softmax(z[i])[y[i]] for i in range(len(y))) / len(y)


@pytest.mark.parametrize("w1,w2,rate", [(5.0, 1.0, 1.0), (2.0, 3.0, 0.3)])
def test_step_matches_reference(w1, w2, rate):
    torch.manual_seed(0)
    model = build_model("small", "concat", C)
    plug = Balancer("reconboost", model.modalities(), recon_w1=w1, recon_w2=w2, recon_boost_rate=rate)
    twin = copy.deepcopy(model).double()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    audio, visual, labels = _batch()
    plug.begin_epoch(0, steps=1)
    result = plug.train_step({"audio": audio, "visual": visual}, labels, opt)
    assert result.updates == 4

    y = labels.tolist()
    params = dict(twin.named_parameters())
    learners = [n for n in params if n.startswith("aux_heads.")]
    encoders = {u: [n for n in params if n.startswith(f"{u}_encoder.")] for u in ("audio", "visual")}
    boosts = []

    def sgd(names, loss):
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        with torch.no_grad():
            for n, g in zip(names, grads):
                if g is not None:
                    params[n] -= LR * g

    for u, w in (("audio", "visual"), ("visual", "audio")):
        out = twin(audio.double(), visual.double())
        head = twin.aux_heads
        z = {"audio": head.head(out.feat_a), "visual": head.head(out.feat_v)}
        loss = _boost(z[u], (head.rate * z[w]).detach(), y, w1, w2)
        boosts.append(float(loss.detach()))
        sgd([*encoders[u], "aux_heads.head.weight", "aux_heads.head.bias"], loss)
        out = twin(audio.double(), visual.double())
        fused = head.rate * (head.head(out.feat_a) + head.head(out.feat_v))
        sgd([*encoders["audio"], *encoders["visual"], *learners], _ce(fused, y))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.double(), params[n], rtol=1e-5, atol=1e-6, msg=n)
    assert (result.stats["recon_boost_a"], result.stats["recon_boost_v"]) == pytest.approx(boosts, rel=1e-5, abs=1e-6)
    assert result.stats["recon_rate"] == pytest.approx(float(params["aux_heads.rate"]), rel=1e-5)
    assert result.stats["recon_ga_a"] == 0.0            # the first active epoch: no consolidation term
    # the ensemble at evaluation and each learner's logits
    model.eval()
    twin.eval()
    with torch.no_grad():
        ev = plug.evaluate(plug.modalities.run({"audio": audio, "visual": visual}))
        o = twin(audio.double(), visual.double())
        za, zv = twin.aux_heads.head(o.feat_a), twin.aux_heads.head(o.feat_v)
    torch.testing.assert_close(ev.logits.double(), twin.aux_heads.rate * (za + zv), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ev.unimodal["visual"].double(), zv, rtol=1e-5, atol=1e-5)


def test_outside_the_active_epochs_only_the_rectification_runs():
    torch.manual_seed(0)
    model = build_model("small", "concat", C)
    plug = Balancer("reconboost", model.modalities(), start_epoch=1)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    audio, visual, labels = _batch()
    plug.begin_epoch(0, steps=1)
    head = model.head.fc.weight.detach().clone()
    result = plug.train_step({"audio": audio, "visual": visual}, labels, opt)
    assert result.updates == 1 and "recon_boost_a" in result.stats and result.stats["recon_boost_a"] == 0.0
    assert torch.equal(model.head.fc.weight, head)        # our fusion head is never trained


def test_three_modalities_boost_each_in_turn():
    model, side = _tri()
    plug = Balancer("reconboost", side)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plug.begin_epoch(1, steps=1)
    inputs, labels = _tri_batch(16)
    result = plug.train_step(inputs, labels, opt)
    assert result.updates == 6
    assert all(result.stats[f"recon_ga_{t}"] > 0 for t in "avt")   # second epoch: reported, not trained


def test_refusals():
    with pytest.raises(ConfigError, match="--modulation reconboost works with --fusion concat, not 'sum'"):
        resolve("demo", shards="x", out="y", modulation="reconboost", fusion="sum")
    with pytest.raises(ConfigError, match="--recon-w1 must be >= 0"):
        resolve("demo", shards="x", out="y", modulation="reconboost", recon_w1=-1.0)
