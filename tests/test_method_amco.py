"""AMCo: one step against a naive float64 reference written from the equations (module docstring of
ogmge_train/modulation/amco.py), the mask schedule, the dependent rule and the evaluation fusion."""
import copy
import math

import pytest
import torch

from ogmge_train.errors import ConfigError
from ogmge_train.models import build_model
from ogmge_train.modulation import Step, amco
from ogmge_train.modulation.base import step_generator
from ogmge_train.plugin import Balancer

B, C = 8, 5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return ({"audio": torch.randn(B, 1, 32, 48, generator=g), "visual": torch.randn(B, 1, 3, 32, 32, generator=g)},
            torch.randint(0, C, (B,), generator=g))


def _log_softmax_true(row, y):
    """log softmax(row)[y], written out (autograd through it)."""
    top = row.detach().max()
    return row[y] - top - torch.log(sum(torch.exp(v - top) for v in row))


def test_mask_ratio_follows_the_sine_ramp_and_masks_floor_p_c_classes():
    # epoch 1, eps 0.3: l = 0, 0.1, 0.2, 0.3 -> p = 0, 1/2, sqrt(3)/2, 1
    assert [amco.mask_ratio(0.1 * i, 0.3) for i in range(5)] == pytest.approx([0, 0.5, math.sqrt(3) / 2, 1, 1])
    for p, zeros in ((0.0, 0), (0.5, 3), (0.866, 6), (1.0, 7)):
        m = amco.class_mask(7, p, torch.Generator().manual_seed(3), "cpu")
        assert m.shape == (7,) and int((m == 0).sum()) == zeros and set(m.tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_one_step_matches_float64_reference(fusion):
    torch.manual_seed(0)
    model = build_model("small", fusion, C)
    bal = Balancer("amco", model.modalities(), seed=5)
    method = bal.method
    method.begin_epoch(type("S", (), {"modalities": bal.modalities})())
    method.level, method.dependent = 0.1, {"audio": True, "visual": False}     # p = 1/2: floor(2.5) = 2 zeros
    twin = copy.deepcopy(model).double()
    inputs, labels = _batch()
    step = Step(bal.modalities, labels, 1, generator=step_generator(5, 0, labels.device), inputs=inputs, seed=5)
    out = bal.modalities.run(inputs)
    model.zero_grad()
    method.loss(out, step).backward()
    stats = method.after_backward(out, step)

    # reference: per-sample float64 loops over the equations
    mask = amco.class_mask(C, 0.5, step_generator(5, 0, labels.device), "cpu").double()
    assert int((mask == 0).sum()) == 2
    fa = twin.audio_encoder(inputs["audio"].double())
    fv = twin.visual_encoder(inputs["visual"].double())
    if fusion == "concat":
        w, b = twin.head.fc.weight, twin.head.fc.bias
        za = fa @ w[:, :fa.shape[1]].T + b / 2
        zv = fv @ w[:, fa.shape[1]:].T + b / 2
    else:
        za, zv = twin.head.fc_a(fa), twin.head.fc_v(fv)
    za = za * mask                                   # audio is dependent: masked
    star_w, star_b = twin.aux_heads.weight, twin.aux_heads.bias
    total = 0
    for i in range(B):
        y = int(labels[i])
        fused = [sum(star_w[c, j] * (za[i, j] + zv[i, j]) for j in range(C)) + star_b[c] for c in range(C)]
        total = total - _log_softmax_true(torch.stack(fused), y) - _log_softmax_true(za[i], y) \
            - _log_softmax_true(zv[i], y)
    (total / B).backward()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), n
            continue
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-7, msg=n)

    # the dependent rule for the next step: mean softmax share of each block of [z'_a, z'_v] > 1/2
    with torch.no_grad():
        shares = [0.0, 0.0]
        for i in range(B):
            row = torch.cat([za[i], zv[i]]).tolist()
            e = [math.exp(v - max(row)) for v in row]
            shares[0] += sum(e[:C]) / sum(e) / B
            shares[1] += sum(e[C:]) / sum(e) / B
    assert method.dependent == {"audio": shares[0] > 0.5, "visual": shares[1] > 0.5}
    assert stats["amco_p"] == pytest.approx(0.5) and (stats["amco_dep_a"], stats["amco_dep_v"]) == (1.0, 0.0)
    assert method.level == pytest.approx(0.2)          # + epoch / 10


def test_inactive_epochs_train_the_star_layer_on_the_fused_logits_and_evaluation_uses_it():
    torch.manual_seed(0)
    model = build_model("small", "concat", C)
    bal = Balancer("amco", model.modalities(), start_epoch=2)
    inputs, labels = _batch(1)
    out = bal.modalities.run(inputs)
    step = Step(bal.modalities, labels, 0, inputs=inputs)
    loss = bal.method.loss(out, step)
    expected = torch.nn.functional.cross_entropy(model.aux_heads(out.logits), labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert bal.method.after_backward(out, step)["amco_p"] == 0.0
    assert torch.equal(bal.predict(out), model.aux_heads(out.logits))


def test_state_round_trips_and_epochs_start_independent():
    torch.manual_seed(0)
    model = build_model("small", "concat", C)
    bal = Balancer("amco", model.modalities())
    bal.method.level, bal.method.dependent = 0.7, {"audio": False, "visual": True}
    state = bal.state_dict()
    other = Balancer("amco", build_model("small", "concat", C).modalities())
    other.load_state_dict(state)
    assert (other.method.level, other.method.dependent) == (0.7, {"audio": False, "visual": True})
    other.begin_epoch(3)
    assert (other.method.level, other.method.dependent) == (0.0, {"audio": False, "visual": False})


@pytest.mark.parametrize("fusion", ["film", "gated"])
def test_non_additive_fusions_are_refused(fusion):
    with pytest.raises(ConfigError, match="--modulation amco works with --fusion concat or sum"):
        Balancer("amco", build_model("small", fusion, C).modalities(), fusion=fusion)
    # a model of one's own whose unimodal logits do not add up to the fused ones: refused at the first step
    torch.manual_seed(0)
    model = build_model("small", fusion, C)
    bal = Balancer("amco", model.modalities())
    inputs, labels = _batch()
    with pytest.raises(ConfigError, match="sum to the fused logits"):
        bal.train_step(inputs, labels, torch.optim.SGD(model.parameters(), lr=0.1))
