"""mmcosine (ICASSP 2023): the loss, its gradients and the evaluation logits against a naive float64
reference (per sample and class: s * cos(f_u, W_u[c]), summed over modalities)."""
import copy
import math

import pytest
import torch

from ogmge_train.config import resolve
from ogmge_train.errors import ConfigError
from ogmge_train.models import build_model
from ogmge_train.plugin import Balancer
from tests._helpers import av_batch
from tests.test_plugin import NAMES3, _tri, _tri_batch

B, C, S = 8, 5, 15.0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(seed=0):
    return av_batch(B, C, seed)


def _cos(x, w):
    dot = sum(a * b for a, b in zip(x, w))
    return dot / (torch.sqrt(sum(a * a for a in x)) * torch.sqrt(sum(b * b for b in w)))


def _naive_logits(features, blocks, scale):
    """{u: [[s cos(f_u[i], W_u[c]) for c] for i]} with autograd through every element."""
    return {u: [[scale * _cos(list(features[u][i]), list(blocks[u][c])) for c in range(len(blocks[u]))]
                for i in range(len(features[u]))] for u in blocks}


def _blocks(twin, fusion):
    if fusion == "concat":
        w = twin.head.fc.weight
        d = twin.audio_encoder.out_dim
        return {"audio": w[:, :d], "visual": w[:, d:]}
    return {"audio": twin.head.fc_a.weight, "visual": twin.head.fc_v.weight}


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_loss_gradients_and_evaluation_match_reference(fusion):
    torch.manual_seed(0)
    model = build_model("small", fusion, C)
    twin = copy.deepcopy(model).double()
    plug = Balancer("mmcosine", model.modalities(), mmcosine_scale=S)
    audio, visual, labels = _batch()
    out = plug.modalities.run({"audio": audio, "visual": visual})
    loss = plug.loss(out, labels)
    loss.backward()
    stats = plug.after_backward(out, labels)

    o = twin(audio.double(), visual.double())
    z = _naive_logits({"audio": o.feat_a, "visual": o.feat_v}, _blocks(twin, fusion), S)
    fused = [[z["audio"][i][c] + z["visual"][i][c] for c in range(C)] for i in range(B)]
    ref = sum(-fused[i][labels[i]] + torch.log(sum(torch.exp(x) for x in fused[i])) for i in range(B)) / B
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    ref.backward()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        if q.grad is None:                     # the head bias: reached with zeros (DDP), unused
            assert not p.grad.any(), n
        else:
            torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-5 * float(q.grad.abs().max()), msg=n)
    s = [sum(math.exp(float(z[u][i][labels[i]])) / sum(math.exp(float(x)) for x in z[u][i]) for i in range(B))
         for u in ("audio", "visual")]
    assert stats["rho_v"] == pytest.approx(s[1] / s[0], rel=1e-5) and stats["k_a"] == stats["k_v"] == 1.0

    model.eval()
    twin.eval()
    with torch.no_grad():
        ev = plug.evaluate(plug.modalities.run({"audio": audio, "visual": visual}))
        o = twin(audio.double(), visual.double())
        z = _naive_logits({"audio": o.feat_a, "visual": o.feat_v}, _blocks(twin, fusion), S)
    want = torch.tensor(z["audio"]) + torch.tensor(z["visual"])
    torch.testing.assert_close(ev.logits.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ev.unimodal["visual"].double(), torch.tensor(z["visual"]), rtol=1e-5, atol=1e-5)
    assert float(ev.logits.abs().max()) <= 2 * S + 1e-4          # cosines: bounded by the scale


def test_outside_the_active_epochs_the_heads_own_logits_train():
    torch.manual_seed(0)
    model = build_model("small", "concat", C)
    plug = Balancer("mmcosine", model.modalities(), start_epoch=2)
    audio, visual, labels = _batch()
    out = plug.modalities.run({"audio": audio, "visual": visual})
    assert torch.equal(plug.loss(out, labels), torch.nn.functional.cross_entropy(out.logits, labels))


def test_three_modalities_split_the_concat_head():
    model, side = _tri()
    plug = Balancer("mmcosine", side)
    inputs, labels = _tri_batch(16)
    ev = plug.evaluate(side.run(inputs))
    w = model.head.weight
    for i, u in enumerate(NAMES3):
        f = side.run(inputs).features[u]
        want = S * torch.nn.functional.normalize(f, dim=1) @ torch.nn.functional.normalize(w[:, 6 * i:6 * i + 6],
                                                                                           dim=1).T
        torch.testing.assert_close(ev.unimodal[u], want)


@pytest.mark.parametrize("fusion", ["film", "gated"])
def test_heads_without_modality_blocks_are_refused(fusion):
    with pytest.raises(ConfigError, match=f"--modulation mmcosine works with --fusion concat or sum, not '{fusion}'"):
        resolve("demo", shards="x", out="y", modulation="mmcosine", fusion=fusion)
    with pytest.raises(ConfigError, match="mmcosine: needs a linear head over the concatenated features"):
        Balancer("mmcosine", build_model("small", fusion, C).modalities())
