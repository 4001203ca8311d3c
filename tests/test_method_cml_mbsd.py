"""cml (ICML 2023) and mbsd (BalanceBenchmark): one step against naive per-sample float64
references of their losses; gradients compared with autograd through the reference loss."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ogmge_train import modulation
from ogmge_train.models import build_model
from tests._helpers import av_batch

B, C = 8, 5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(seed=0):
    return av_batch(B, C, seed)


def _softmax(row):
    z = [math.exp(v - max(row)) for v in row]
    return [v / sum(z) for v in z]


def _ce(rows, labels):
    return sum(-math.log(_softmax(r)[y]) for r, y in zip(rows, labels)) / len(rows)


def _step(name, fusion, favour=False, **kw):
    torch.manual_seed(0)
    model = build_model("small", fusion, C)
    audio, visual, labels = _batch()
    with torch.no_grad():                      # a non-zero head bias, so the bias split matters
        for m in model.head.modules():
            if isinstance(m, torch.nn.Linear):
                m.bias.normal_()
                if favour and m.out_features == C:   # samples of one class right in one or both modalities
                    m.bias[labels[0]] += 6.0
    twin = copy.deepcopy(model)
    method = modulation.build(name, alpha=0.0, start_epoch=0, end_epoch=None, **kw)
    side = model.modalities()
    out = side.run({"audio": audio, "visual": visual})
    step = modulation.Step(side, labels, epoch=0)
    loss = method.loss(out, step)
    loss.backward()
    stats = method.after_backward(out, step)
    return model, twin, method, loss, stats, (audio, visual, labels)


def _assert_same_grads(model, twin):
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), n
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("fusion,removed", [("concat", 0), ("concat", 1), ("film", 1)])
def test_cml_step_matches_reference(fusion, removed):
    """(CE(z) + CE(z_p)) / 2 + lambda max(0, sum_i conf_p - conf_s), z_p the kept modality's logits."""
    torch.manual_seed(7)
    model, twin, method, loss, stats, (audio, visual, labels) = _step("cml", fusion, cml_lambda=0.3)
    assert stats["cml_removed"] == method.removed
    # rebuild with the wanted removal
    method.removed = removed
    model.zero_grad()
    side = model.modalities()
    out = side.run({"audio": audio, "visual": visual})
    loss = method.loss(out, modulation.Step(side, labels, epoch=0))
    loss.backward()
    ref = twin(audio, visual)
    partial = ref.logits_v if removed == 0 else ref.logits_a
    full_rows, part_rows = ref.logits.double().tolist(), partial.double().tolist()
    y = labels.tolist()
    penalty = max(0.0, sum(max(_softmax(p)) - max(_softmax(f)) for f, p in zip(full_rows, part_rows)))
    want = (_ce(full_rows, y) + _ce(part_rows, y)) / 2 + 0.3 * penalty
    assert loss.item() == pytest.approx(want, rel=1e-5)
    conf = lambda z: z.softmax(1).max(1).values                         # noqa: E731
    ((F.cross_entropy(ref.logits, labels) + F.cross_entropy(partial, labels)) / 2
     + 0.3 * torch.clamp((conf(partial) - conf(ref.logits)).sum(), min=0)).backward()
    _assert_same_grads(model, twin)


def test_cml_is_plain_ce_outside_the_active_epochs():
    torch.manual_seed(0)
    model = build_model("small", "sum", C)
    audio, visual, labels = _batch()
    method = modulation.build("cml", alpha=0.0, start_epoch=2, end_epoch=None)
    side = model.modalities()
    out = side.run({"audio": audio, "visual": visual})
    assert torch.equal(method.loss(out, modulation.Step(side, labels, epoch=1)), F.cross_entropy(out.logits, labels))
    method.removed = 1
    twin = modulation.build("cml", alpha=0.0, start_epoch=2, end_epoch=None)
    twin.load_state_dict(method.state_dict())
    assert twin.removed == 1


@pytest.mark.parametrize("fusion", ["concat", "sum", "gated"])
def test_mbsd_step_matches_reference(fusion):
    """CE + CE_a + CE_v + (1/B) sum w_i (RS_i + KL_i), per sample in float64."""
    model, twin, method, loss, stats, (audio, visual, labels) = _step("mbsd", fusion, favour=True)
    ref = twin(audio, visual)
    za, zv, z = ref.logits_a.double().tolist(), ref.logits_v.double().tolist(), ref.logits.double().tolist()
    y = labels.tolist()
    rs_sum = kl_sum = 0.0
    for i in range(B):
        pa, pv = _softmax(za[i]), _softmax(zv[i])
        qa, qv = pa[y[i]], pv[y[i]]
        right = pa.index(max(pa)) == y[i] or pv.index(max(pv)) == y[i]
        w = (max(qa, qv) - min(qa, qv)) if right else 0.0
        rs = sum((a - b) ** 2 for a, b in zip(za[i], zv[i])) / C
        ps, pw = max(qa, qv), min(qa, qv)
        kl = pw * (math.log(pw) - ps)
        rs_sum += w * rs
        kl_sum += w * kl
    want = _ce(z, y) + _ce(za, y) + _ce(zv, y) + rs_sum / B + kl_sum / B
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert (stats["mbsd_rs"], stats["mbsd_kl"]) == pytest.approx((rs_sum / B, kl_sum / B), rel=1e-4, abs=1e-9)
    assert rs_sum > 0
    # gradients through w, ps, pw as the benchmark's index-assigned tensors carry them
    pa, pv = ref.logits_a.softmax(1), ref.logits_v.softmax(1)
    qa, qv = pa.gather(1, labels[:, None])[:, 0], pv.gather(1, labels[:, None])[:, 0]
    right = (pa.argmax(1) == labels) | (pv.argmax(1) == labels)
    w = torch.where(right, torch.maximum(qa, qv) - torch.minimum(qa, qv), torch.zeros_like(qa))
    rs = ((ref.logits_a - ref.logits_v) ** 2).sum(1) / C
    ps, pw = torch.maximum(qa, qv), torch.minimum(qa, qv)
    kl = pw * (torch.log(pw) - ps)
    (F.cross_entropy(ref.logits, labels) + F.cross_entropy(ref.logits_a, labels)
     + F.cross_entropy(ref.logits_v, labels) + (w * rs).mean() + (w * kl).mean()).backward()
    _assert_same_grads(model, twin)
