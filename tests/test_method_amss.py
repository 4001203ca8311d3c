"""amss / amss-plus (TPAMI 2025): the modal significance and the Fisher-importance masks of one step
against naive float64 references."""
import math

import pytest
import torch

from ogmge_train import modulation
from ogmge_train.modalities import Output
from ogmge_train.models import build_model
from tests._helpers import av_batch

B, C, T = 8, 5, 0.2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _log_softmax(row):
    top = max(row)
    lse = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - lse for v in row]


def _reference_keep(out, labels):
    """keep_u and rate_u in float64 from the definitions, one sample at a time."""
    ys = labels.tolist()
    counts = [ys.count(c) for c in range(C)]
    h_y = -sum(n / B * math.log(n / B) for n in counts if n)
    rate = {}
    for u in ("audio", "visual"):
        ce = -sum(_log_softmax(out.unimodal[u][i].double().tolist())[ys[i]] for i in range(B)) / B
        ent = 0.0
        for i in range(B):
            ls = _log_softmax(out.features[u][i].double().tolist())
            ent -= sum(math.exp(v) * v for v in ls) / B
        rate[u] = (h_y - ce + 0.5, ent)
    nums = [rate[u][0] for u in rate]
    r = [rate[u][0] / rate[u][1] for u in rate]
    if min(nums) <= 0:
        return [0.5, 0.5], r
    ea, ev = math.exp(r[1] / T), math.exp(r[0] / T)     # keep_a = e^{r_v/T} / (e^{r_v/T} + e^{r_a/T})
    return [min(max(ea / (ea + ev), 0.1), 0.9), min(max(ev / (ea + ev), 0.1), 0.9)], r


def _step(model, fusion_seed=0, start_epoch=0, method="amss"):
    torch.manual_seed(fusion_seed)
    side = model.modalities()
    bal = modulation.build(method, start_epoch=start_epoch)
    audio, visual, labels = av_batch(B, C)
    out = side.run({"audio": audio, "visual": visual})
    torch.nn.functional.cross_entropy(out.logits, labels).backward()
    return side, bal, out, labels


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_significance_matches_reference(fusion):
    torch.manual_seed(0)
    model = build_model("small", fusion, C)
    side, method, out, labels = _step(model)
    keep, rate = method.significance(out, modulation.Step(side, labels, epoch=0))
    want_keep, want_rate = _reference_keep(out, labels)
    assert keep.tolist() == pytest.approx(want_keep, rel=1e-9)
    assert rate.tolist() == pytest.approx(want_rate, rel=1e-9)


def test_equal_shares_when_a_rate_numerator_is_not_positive():
    torch.manual_seed(0)
    side = build_model("small", "concat", C).modalities()
    labels = torch.arange(B) % C
    wrong = torch.full((B, C), 0.0).scatter_(1, ((labels + 1) % C)[:, None], 50.0)   # CE ~ 50 > H(Y) + 0.5
    feats = {"audio": torch.randn(B, 4), "visual": torch.randn(B, 4)}
    out = Output(wrong, {"audio": wrong, "visual": wrong.flip(0)}, feats)
    keep, _ = modulation.build("amss").significance(out, modulation.Step(side, labels, epoch=0))
    assert keep.tolist() == [0.5, 0.5]


@pytest.mark.parametrize("method", ["amss", "amss-plus"])
def test_masks_match_reference(method):
    """Per modulated conv weight: ceil(n keep_u) output units drawn without replacement by
    p_j = F_j / sum F (F_j the unit's summed squared gradient) keep their gradient (amss-plus: times
    1 / (p_j + 1/n)), every other unit's gradient is 0; nothing else changes."""
    torch.manual_seed(0)
    model = build_model("small", "concat", C)
    side, bal, out, labels = _step(model, method=method)
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(7)
    stats = bal.after_backward(out, modulation.Step(side, labels, epoch=0, generator=gen))
    keep, _ = _reference_keep(out, labels)
    assert [stats["amss_keep_a"], stats["amss_keep_v"]] == pytest.approx(keep, rel=1e-9)
    replay = torch.Generator().manual_seed(7)
    masked = {id(p): u for u, k in zip(side.names, keep) for p in side.modulated(u)}
    named = dict(model.named_parameters())
    assert len(masked) == sum(p.dim() == 4 for n, p in named.items() if "encoder" in n)
    for name, p in model.named_parameters():
        g0 = before[name]
        if id(p) not in masked:
            assert torch.equal(p.grad, g0), name
            continue
        k = keep[side.names.index(masked[id(p)])]
        fisher = g0.double().pow(2).flatten(1).sum(1)
        prob = fisher / fisher.sum()
        n = fisher.numel()
        draws = min(math.ceil(n * k), int((fisher > 0).sum()))
        kept = torch.multinomial(fisher.float().div(fisher.float().sum()), draws, replacement=False, generator=replay)
        want = torch.zeros_like(g0, dtype=torch.float64)
        for j in kept.tolist():
            scale = 1 / (prob[j].item() + 1 / n) if method == "amss-plus" else 1.0
            want[j] = g0[j].double() * scale
        assert int((p.grad.flatten(1).abs().sum(1) > 0).sum()) == draws, name
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-6, atol=0.0, msg=name)


def test_no_masks_outside_the_active_epochs():
    torch.manual_seed(0)
    model = build_model("small", "concat", C)
    side, bal, out, labels = _step(model, start_epoch=2)
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    stats = bal.after_backward(out, modulation.Step(side, labels, epoch=1, generator=torch.Generator()))
    assert 0.1 <= stats["amss_keep_a"] <= 0.9
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())


def test_the_more_significant_modality_keeps_fewer_units():
    torch.manual_seed(0)
    model = build_model("small", "concat", C)
    side, bal, out, labels = _step(model)
    strong = Output(out.logits, {"audio": out.unimodal["audio"], "visual": out.unimodal["visual"]},
                    dict(out.features))
    strong.unimodal["audio"] = torch.nn.functional.one_hot(labels, C).float() * 6.0     # audio nearly right
    keep, rate = bal.significance(strong, modulation.Step(side, labels, epoch=0))
    assert rate[0] > rate[1] and keep[0] < keep[1]
