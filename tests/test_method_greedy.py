"""Greedy: the mid-fusion stage hook of our model, one step against a naive float64 reference of the
MMTM blocks, the unimodal losses and the conditional learning speeds (module docstring of
ogmge_train/modulation/greedy.py), the re-balancing window rule and evaluation."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ogmge_train.errors import ConfigError
from ogmge_train.modalities import Modalities
from ogmge_train.models import build_model
from ogmge_train.plugin import Balancer

B, C = 8, 5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(seed=0, frames=2):
    g = torch.Generator().manual_seed(seed)
    return ({"audio": torch.randn(B, 1, 32, 48, generator=g), "visual": torch.randn(B, frames, 3, 32, 32, generator=g)},
            torch.randint(0, C, (B,), generator=g))


def _greedy(**kw):
    torch.manual_seed(0)
    model = build_model("small", "sum", C)
    return model, Balancer("greedy", model.modalities(), **kw)


class _Identity:
    def __call__(self, features):
        return features

    def stage(self, i, maps):
        self.seen = [*getattr(self, "seen", []), {u: tuple(x.shape) for u, x in maps.items()}]
        return maps


def test_stage_hook_sees_every_stage_and_changes_nothing_when_it_returns_the_maps():
    torch.manual_seed(0)
    model = build_model("small", "sum", C).eval()
    side = model.modalities()
    inputs, _ = _batch(frames=3)
    hook = _Identity()
    assert torch.equal(side.run(inputs).logits, side.run(inputs, hook).logits)
    assert side.stages == {"audio": (32, 64, 128, 128), "visual": (32, 64, 128, 128)}
    assert hook.seen[0] == {"audio": (B, 32, 16, 24), "visual": (B, 32, 3, 16, 16)}     # (B, C, ...) each
    assert len(hook.seen) == 4


def _mmtm64(block, xs, curate=None, avg=None):
    """The MMTM equations in float64 on maps xs = [x_a, x_v] (B, C_u, ...)."""
    s = torch.cat([x.flatten(2).mean(2) for x in xs], 1)
    e = torch.relu(s @ block.squeeze.weight.T + block.squeeze.bias)
    out = []
    for j, x in enumerate(xs):
        c = torch.sigmoid(e @ block.excite[j].weight.T + block.excite[j].bias)
        if curate == j:
            c = avg[j].expand_as(c)
        out.append(x * c.view(*c.shape, *([1] * (x.dim() - 2))))
    return out


def _reference_step(twin, inputs, labels, curate=None, avgs=None):
    """Forward (stage by stage, MMTM after stages 1..3), loss CE(z_a) + CE(z_v), backward: float64."""
    a, v = inputs["audio"].double(), inputs["visual"].double()
    b = v.shape[0]
    xa, xv = a, v.flatten(0, 1)
    for i in range(4):
        xa, xv = twin.audio_encoder.trunk.stage(i, xa), twin.visual_encoder.trunk.stage(i, xv)
        if i >= 1:
            block = twin.aux_heads[str(i)]
            ya, yv = _mmtm64(block, [xa, xv.unflatten(0, (b, -1)).transpose(1, 2)], curate,
                             None if avgs is None else avgs[i])
            xa, xv = ya, yv.transpose(1, 2).flatten(0, 1)
    fa, fv = xa.mean((2, 3)), xv.unflatten(0, (b, -1)).mean((1, 3, 4))
    za, zv = twin.head.fc_a(fa), twin.head.fc_v(fv)
    total = 0
    for i in range(b):         # per sample, -log softmax written out
        for z in (za[i], zv[i]):
            total = total - (z[labels[i]] - torch.log(torch.exp(z).sum()))
    (total / b).backward()


@pytest.mark.parametrize("curate", [None, 1])
def test_one_step_matches_float64_reference(curate):
    model, bal = _greedy(greedy_eps=1e9)
    method = bal.method
    blocks = model.aux_heads
    with torch.no_grad():           # some history in the running averages
        for blk in blocks.values():
            blk.avg0.uniform_(0.2, 0.8), blk.avg1.uniform_(0.2, 0.8)
            blk.count.fill_(3)
    method.curating = curate
    twin = copy.deepcopy(model).double()
    inputs, labels = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)      # lr 0: the gradients stay readable
    stats = bal.train_step(inputs, labels, opt).stats

    # the averages the curated forward uses include this batch: (batch mean + avg * n) / (n + 1)
    avgs = {}
    with torch.no_grad():
        xa, xv = inputs["audio"].double(), inputs["visual"].double().flatten(0, 1)
        for i in range(4):
            xa, xv = twin.audio_encoder.trunk.stage(i, xa), twin.visual_encoder.trunk.stage(i, xv)
            if i >= 1:
                blk = twin.aux_heads[str(i)]
                maps = [xa, xv.unflatten(0, (B, -1)).transpose(1, 2)]
                s = torch.cat([x.flatten(2).mean(2) for x in maps], 1)
                e = torch.relu(s @ blk.squeeze.weight.T + blk.squeeze.bias)
                means = [torch.sigmoid(e @ blk.excite[j].weight.T + blk.excite[j].bias).mean(0) for j in (0, 1)]
                avgs[i] = [(means[j] + blk.average(j) * 3) / 4 for j in (0, 1)]
                xa, xv = _mmtm64(blk, maps, curate, avgs[i])
                xv = xv.transpose(1, 2).flatten(0, 1)
    _reference_step(twin, inputs, labels, curate, avgs)
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        g = torch.zeros_like(q) if q.grad is None else q.grad
        torch.testing.assert_close(p.grad.double(), g, rtol=2e-4, atol=1e-5 * float(g.abs().max()) + 1e-12,
                                   msg=lambda m, n=n: f"{n}: {m}")
    for i, blk in blocks.items():           # the averages were committed
        for j in (0, 1):
            torch.testing.assert_close(blk.average(j).double(), avgs[int(i)][j], rtol=1e-5, atol=1e-7)
        assert int(blk.count) == 4
    assert stats["greedy_cur_v"] == float(curate == 1) and stats["greedy_cur_a"] == 0.0
    if curate is None:        # the speeds: ||g||^2 / ||w||^2 per group, d = log10(b0/m0) - log10(b1/m1)
        def ratio(params):
            grads = sum(float((p.grad.double() ** 2).sum()) for p in params)
            return grads / sum(float((p.detach().double() ** 2).sum()) for p in params)
        shared = [p for blk in twin.aux_heads.values() for p in blk.squeeze.parameters()]
        bypass = [ratio([p for blk in twin.aux_heads.values() for p in blk.excite[j].parameters()] + shared)
                  for j in (0, 1)]
        main = [ratio(list(twin.audio_encoder.parameters())), ratio(list(twin.visual_encoder.parameters()))]
        d = math.log10(bypass[0] / main[0]) - math.log10(bypass[1] / main[1])
        assert stats["greedy_d"] == pytest.approx(d, rel=1e-5)


def test_windows_of_the_rule():
    _, bal = _greedy(greedy_eps=0.0, greedy_window=3, start_epoch=1)
    model = bal.modalities.model
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = []
    for epoch in range(2):
        bal.begin_epoch(epoch)
        for s in range(6):
            r = bal.train_step(*_batch(s), opt)
            seen.append(r.stats["greedy_cur_a"] + r.stats["greedy_cur_v"])
    # epoch 0: measured, never curated; epoch 1: d measured at its first step, a window of 3, measure, window
    assert seen == [0] * 6 + [0, 1, 1, 1, 0, 1]
    assert bal.state_dict()["method"]["window_step"] == 1


def test_evaluation_applies_the_blocks_without_curating_or_updating():
    model, bal = _greedy()
    bal.method.curating = 0
    model.eval()
    inputs, _ = _batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = bal.modalities.run(inputs).logits
        hooked = bal.modalities.run(inputs, bal.eval_hook()).logits
    assert not torch.allclose(plain, hooked)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.equal(bal.predict(bal.modalities.run(inputs, bal.eval_hook())), hooked)


def test_refused_where_undefined():
    for fusion in ("concat", "film", "gated"):
        with pytest.raises(ConfigError, match="--modulation greedy works with --fusion sum"):
            Balancer("greedy", build_model("small", fusion, C).modalities(), fusion=fusion)
    model = build_model("small", "sum", C)
    plain = Modalities(model, {"audio": model.audio_encoder, "visual": model.visual_encoder})
    with pytest.raises(ConfigError, match="stages="):
        Balancer("greedy", plain)
    xvector = build_model("small", "sum", C, audio_arch="xvector", audio_bins=32)      # no stages to fuse between
    assert xvector.modalities().stages is None
    with pytest.raises(ConfigError, match="stages="):
        Balancer("greedy", xvector.modalities())
    # a loop of one's own that does not pass the hook to its forward is told so
    model, bal = _greedy()
    inputs, labels = _batch()
    bal.begin_step(labels, inputs)
    out = bal.modalities.run(inputs)
    loss = bal.loss(out, labels)
    loss.backward()
    with pytest.raises(ConfigError, match="feature_hook"):
        bal.after_backward(out, labels)
    assert F.cross_entropy(out.unimodal["audio"], labels) < loss
