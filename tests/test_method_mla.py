"""mla (CVPR 2024): one training step (alternating unimodal rounds through the shared head, the
projected head gradient, one optimizer update per round) and the entropy-gated evaluation fusion
against naive float64 references written from the equations."""
import copy
import math

import pytest
import torch

from ogmge_train import modulation
from ogmge_train.config import resolve
from ogmge_train.errors import ConfigError
from ogmge_train.models import build_model
from ogmge_train.plugin import Balancer, Modalities
from tests._helpers import av_batch
from tests.test_plugin import NAMES3, _tri, _tri_batch

B, C = 8, 5
LR = 0.1

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(seed=0):
    return av_batch(B, C, seed)


def _ce(z, y):
    """Mean cross-entropy, written out (float64)."""
    return sum(-z[i, y[i]] + torch.logsumexp(z[i], 0) for i in range(len(y))) / len(y)


def _naive_projection(P, r, alpha):
    k = [sum(P[i][j] * r[j] for j in range(len(r))) for i in range(len(r))]
    denom = alpha + sum(r[i] * k[i] for i in range(len(r)))
    new = [[P[i][j] - k[i] * k[j] / denom for j in range(len(r))] for i in range(len(r))]
    norm = math.sqrt(sum(x * x for row in new for x in row))
    return [[x / norm for x in row] for row in new]


@pytest.mark.parametrize("rounds_before", [0, 3])
def test_step_matches_reference(rounds_before):
    """For u = audio, visual: L_u = CE(W f_u + b); encoder u and the head get the gradient of L_u
    (nothing else moves); the head weight's gradient is right-multiplied by P^T with
    P <- (P - k k^T / (a + r^T k)) / ||.||_F, k = P r, r the batch mean of f_u, a = 0.1^(1 + i/n);
    one SGD update per round. The run's very first round is not projected."""
    torch.manual_seed(0)
    model = build_model("small", "concat", C)
    plug = Balancer("mla", model.modalities(), seed=0)
    d = model.audio_encoder.out_dim
    g = torch.Generator().manual_seed(4)
    P0 = torch.randn(d, d, generator=g) / d + torch.eye(d)
    P0 = P0 / torch.linalg.matrix_norm(P0)
    if rounds_before:
        plug.method.rounds, plug.method.P = rounds_before, P0.clone()
    twin = copy.deepcopy(model).double()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    plug.begin_epoch(0, steps=4)
    plug.method._batch = 2                        # the third batch of four: a = 0.1^(1 + 2/4)
    audio, visual, labels = _batch()
    result = plug.train_step({"audio": audio, "visual": visual}, labels, opt)
    assert result.updates == 2

    P = P0.double().tolist() if rounds_before else [[float(i == j) for j in range(d)] for i in range(d)]
    rounds, alpha = rounds_before, 0.1 ** 1.5
    params = dict(twin.named_parameters())
    buffers_after_one_forward = None
    losses = []
    for u, enc in (("audio", "audio_encoder."), ("visual", "visual_encoder.")):
        out = twin(audio.double(), visual.double())
        if buffers_after_one_forward is None:
            buffers_after_one_forward = {n: b.clone() for n, b in twin.named_buffers()}
        f = out.feat_a if u == "audio" else out.feat_v
        W, b = twin.aux_heads.weight, twin.aux_heads.bias
        z = f @ W.T + b
        loss = _ce(z, labels)
        losses.append(loss.item())
        grads = torch.autograd.grad(loss, [p for n, p in params.items() if n.startswith(enc)])
        # head gradients written out: dL/dz = (softmax(z) - onehot) / B
        dz = (torch.softmax(z, 1) - torch.nn.functional.one_hot(labels, C).double()) / B
        gW, gb = (dz.T @ f).detach(), dz.sum(0).detach()
        if rounds > 0:
            r = f.detach().mean(0).tolist()
            P = _naive_projection(P, r, alpha)
            gW = gW @ torch.tensor(P, dtype=torch.float64).T
        rounds += 1
        with torch.no_grad():
            for p, gr in zip([p for n, p in params.items() if n.startswith(enc)], grads):
                p -= LR * gr
            W -= LR * gW
            b -= LR * gb
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.double(), params[n], rtol=1e-5, atol=1e-6, msg=n)
    for n, bf in model.named_buffers():           # BatchNorm counted the batch once
        torch.testing.assert_close(bf.double(), buffers_after_one_forward[n].double(), rtol=1e-5, atol=1e-6, msg=n)
    torch.testing.assert_close(plug.method.P.double(), torch.tensor(P, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    assert plug.method.rounds == rounds_before + 2
    assert (result.stats["mla_loss_a"], result.stats["mla_loss_v"]) == pytest.approx(losses, rel=1e-5)
    assert result.loss.item() == pytest.approx(sum(losses) / 2, rel=1e-5)
    assert result.stats["k_a"] == result.stats["k_v"] == 1.0


def test_fusion_at_evaluation_is_entropy_gated_per_sample():
    """z_u = h(f_u); H_u = -sum p log p per sample; w_u = exp(max H - H_u) / sum_j exp(max H - H_j)."""
    torch.manual_seed(0)
    model = build_model("small", "concat", C).eval()
    plug = Balancer("mla", model.modalities())
    with torch.no_grad():
        model.aux_heads.weight.mul_(8)            # confident, unequal predictions
        audio, visual, _ = _batch(3)
        out = plug.evaluate(plug.modalities.run({"audio": audio, "visual": visual}))
        o = model(audio, visual)
        fa, fv = o.feat_a, o.feat_v
    W, b = model.aux_heads.weight.double(), model.aux_heads.bias.double()
    for i in range(B):
        z = {u: (W @ f[i].double() + b).tolist() for u, f in (("audio", fa), ("visual", fv))}
        entropy = {}
        for u, row in z.items():
            e = [math.exp(x - max(row)) for x in row]
            p = [x / sum(e) for x in e]
            entropy[u] = -sum(q * math.log(q) for q in p)
        top = max(entropy.values())
        raw = {u: math.exp(top - h) for u, h in entropy.items()}
        fused = [sum(raw[u] / sum(raw.values()) * z[u][c] for u in z) for c in range(C)]
        assert out.logits[i].tolist() == pytest.approx(fused, rel=1e-5, abs=1e-5)
        assert out.unimodal["audio"][i].tolist() == pytest.approx(z["audio"], rel=1e-5, abs=1e-5)
    assert torch.equal(out.logits, plug.predict(plug.modalities.run({"audio": audio, "visual": visual})))


def test_three_modalities_alternate_in_order():
    """Three modalities: three rounds, three updates; each round moves its encoder and the head only."""
    model, side = _tri()
    plug = Balancer("mla", side)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plug.begin_epoch(0, steps=1)
    inputs, labels = _tri_batch(16)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = plug.train_step(inputs, labels, opt)
    assert result.updates == 3 and plug.method.rounds == 3
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert moved == {*(f"enc.{u}.0.{w}" for u in NAMES3 for w in ("weight", "bias")), "aux_heads.weight",
                     "aux_heads.bias"}
    assert {"mla_loss_a", "mla_loss_v", "mla_loss_t"} <= set(result.stats)


def test_refusals_and_state():
    with pytest.raises(ConfigError, match="--modulation mla works with --fusion concat, not 'gated'"):
        resolve("demo", shards="x", out="y", modulation="mla", fusion="gated")
    model, _ = _tri()
    uneven = Modalities(model, {u: model.enc[u] for u in NAMES3}, forward=lambda m, i, h: m(i, h), num_classes=4,
                        dims={"audio": 6, "visual": 6, "text": 7})
    with pytest.raises(ConfigError, match="mla: its head is shared by every modality, so their features need one"):
        Balancer("mla", uneven)
    method = modulation.build("mla")
    method.rounds, method.P = 5, torch.eye(3) / 3 ** 0.5
    twin = modulation.build("mla")
    twin.load_state_dict(method.state_dict())
    assert twin.rounds == 5 and torch.equal(twin.P, method.P)
