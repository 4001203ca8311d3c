"""inforeg (CVPR 2025): the information gain rate, the loss, the proximal term and the Fisher trace
against naive float64 references."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ogmge_train import modulation
from ogmge_train.models import build_model
from ogmge_train.modulation.inforeg import gain_rate
from tests._helpers import av_batch

B, C = 8, 5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(seed=0):
    return av_batch(B, C, seed)


def _official_k(traces):
    """The official bookkeeping: a list starting with ten zeros, one trace appended per epoch."""
    lst = [0] * 10 + list(traces)
    if not traces:
        return 1
    tr1, tr2 = sum(lst[-10:]) / 10, sum(lst[-11:-1]) / 10
    return (tr1 - tr2) / tr1


def test_gain_rate_is_the_official_windowed_change():
    traces = [5.0, 3.0, 2.5, 2.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.3]
    for e in range(len(traces) + 1):
        assert gain_rate(traces[:e]) == pytest.approx(_official_k(traces[:e]), rel=1e-12)
    assert gain_rate([]) == gain_rate([5.0]) == 1.0


def _softmax_true(row, y):
    z = [math.exp(v - max(row)) for v in row]
    return z[y] / sum(z)


@pytest.mark.parametrize("fusion,k", [("concat", 1.0), ("sum", 1.0), ("concat", 0.01)])
def test_step_matches_reference(fusion, k):
    """loss = CE + CE_a + CE_v; the higher-scoring modality gets g += beta (theta - theta_prev),
    beta from the official constants; the audio conv-weight trace accumulates sum mean(g^2)."""
    torch.manual_seed(0)
    model = build_model("small", fusion, C)
    method = modulation.build("inforeg", alpha=0.0, start_epoch=0, end_epoch=None)
    side = model.modalities()
    method.begin_epoch(modulation.EpochStart(side, 0, 1, lambda n: iter([])))
    method.k = k                                   # the window is open iff k > 0.05
    theta_prev = copy.deepcopy(model)
    with torch.no_grad():                          # as if some steps of the epoch had been taken
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    twin = copy.deepcopy(model)
    audio, visual, labels = _batch()
    out = side.run({"audio": audio, "visual": visual})
    step = modulation.Step(side, labels, epoch=0)
    loss = method.loss(out, step)
    loss.backward()
    stats = method.after_backward(out, step)

    ref = twin(audio, visual)
    ref_loss = (F.cross_entropy(ref.logits, labels) + F.cross_entropy(ref.logits_a, labels)
                + F.cross_entropy(ref.logits_v, labels))
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    ref_loss.backward()
    with torch.no_grad():
        s_a = sum(_softmax_true(ref.logits_a[i].double().tolist(), int(labels[i])) for i in range(B))
        s_v = sum(_softmax_true(ref.logits_v[i].double().tolist(), int(labels[i])) for i in range(B))
    beta = [0.0, 0.0]
    if k > 0.05:
        if s_a > s_v:
            beta[0] = 0.95 * math.exp(math.tanh(s_a - s_v))
        else:
            beta[1] = 0.1 * math.exp(math.tanh(s_v - s_a))
    assert (stats["beta_a"], stats["beta_v"]) == pytest.approx(beta, rel=1e-6)
    prev = dict(theta_prev.named_parameters())
    trace = 0.0
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        want = q.grad.double()
        for u, prefix in enumerate(("audio_encoder.", "visual_encoder.")):
            if name.startswith(prefix):
                want = want + beta[u] * (q.double() - prev[name].double())
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-5, atol=1e-7, msg=name)
        if name.startswith("audio_encoder.") and p.dim() == 4:
            trace += (want ** 2).mean().item()
    assert method.running == pytest.approx(trace, rel=1e-5)
    # the next epoch records the trace and recomputes k from it
    method.begin_epoch(modulation.EpochStart(side, 1, 1, lambda n: iter([])))
    assert method.traces == pytest.approx([trace]) and method.k == 1.0 and method.running is None


def test_no_regulation_outside_the_active_epochs():
    torch.manual_seed(0)
    model = build_model("small", "concat", C)
    method = modulation.build("inforeg", alpha=0.0, start_epoch=3, end_epoch=None)
    side = model.modalities()
    method.begin_epoch(modulation.EpochStart(side, 0, 1, lambda n: iter([])))
    audio, visual, labels = _batch()
    out = side.run({"audio": audio, "visual": visual})
    step = modulation.Step(side, labels, epoch=0)
    method.loss(out, step).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    stats = method.after_backward(out, step)
    assert stats["beta_a"] == stats["beta_v"] == 0.0
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())


def test_state_round_trips():
    method = modulation.build("inforeg", alpha=0.0, start_epoch=0, end_epoch=None)
    method.traces, method.running = [1.0, 0.5], 0.25
    twin = modulation.build("inforeg", alpha=0.0, start_epoch=0, end_epoch=None)
    twin.load_state_dict(method.state_dict())
    assert (twin.traces, twin.running) == ([1.0, 0.5], 0.25)
