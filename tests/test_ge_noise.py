"""``--ge-noise paper``: GE noise with the mini-batch gradient covariance (paper eqs. 13, 16), from one
extra backward of ``sum_i z_i l_i``, against per-sample gradients computed naively (one backward per
sample): exactly for fixed z, statistically for drawn z, and its 1/m scaling with the batch size."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ogmge_train.models import av_output, build_model
from ogmge_train.modulation.base import PaperNoise, Step
from ogmge_train.plugin import Balancer, Modalities, Output

pytestmark = pytest.mark.usefixtures("one_torch_thread")

C = 3


class Linear2(nn.Module):
    """Two linear encoders and a concatenation head: no BatchNorm, so samples' losses are independent."""

    def __init__(self):
        super().__init__()
        self.audio, self.visual = nn.Linear(4, 3), nn.Linear(4, 3)
        self.head = nn.Linear(6, C)

    def forward(self, inputs, hook=None):
        f = {"audio": self.audio(inputs["audio"]), "visual": self.visual(inputs["visual"])}
        w, b = self.head.weight, self.head.bias
        return Output(self.head(torch.cat([f["audio"], f["visual"]], 1)),
                      {"audio": f["audio"] @ w[:, :3].T + b / 2, "visual": f["visual"] @ w[:, 3:].T + b / 2}, f)


def _linear(seed=0):
    torch.manual_seed(seed)
    model = Linear2()
    return model, Modalities(model, {"audio": model.audio, "visual": model.visual})


def _data(m, g):
    """A fixed distribution: class cues in both inputs plus unit noise."""
    labels = torch.randint(0, C, (m,), generator=g)
    cue = F.one_hot(labels, 4).float()
    return {"audio": torch.randn(m, 4, generator=g) + 1.5 * cue, "visual": torch.randn(m, 4, generator=g) + cue}, labels


def _encoder_params(side):
    return [p for u in side.names for p in side.modulated(u)]


def _per_sample_grads(model, side, inputs, labels, forward=None):
    """(m, d) per-sample gradients of the modulated parameters, one backward per sample through one
    forward of the whole batch (with BatchNorm: the batch statistics are differentiated too)."""
    params = _encoder_params(side)
    out = (forward or model)(inputs)
    losses = F.cross_entropy(out.logits.float(), labels, reduction="none")
    rows = []
    for i in range(len(labels)):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True)
        rows.append(torch.cat([g.flatten() for g in grads]).double())
    return torch.stack(rows)


def _noise(balancer, side, forward, inputs, labels):
    """One ``ge`` step through the hooks: (h, gbar) flattened, h = gradient after - gradient before."""
    params = _encoder_params(side)
    out = forward(inputs)
    loss = balancer.loss(out, labels)
    for p in params:
        p.grad = None
    loss.backward()
    gbar = torch.cat([p.grad.flatten() for p in params]).double()
    balancer.after_backward(out, labels)
    after = torch.cat([p.grad.flatten() for p in params]).double()
    return after - gbar, gbar


@pytest.mark.parametrize("kind", ["linear", "batchnorm"])
def test_paper_noise_equals_the_per_sample_formula_for_fixed_z(monkeypatch, kind):
    """h = sqrt(m/(m-1)) / m * sum_i z_i (g_i - gbar), exactly, for a given z; also through our
    BatchNorm model, where g_i is sample i's term of the batch gradient (sum_i g_i / m = gbar)."""
    m = 8
    z = torch.linspace(-1.5, 2.0, m)
    monkeypatch.setattr(PaperNoise, "draw", staticmethod(lambda n, step: z[:n].clone()))
    g = torch.Generator().manual_seed(1)
    if kind == "linear":
        model, side = _linear()
        inputs, labels = _data(m, g)
        forward = model
    else:
        torch.manual_seed(0)
        model = build_model("small", "concat", C)
        side = model.modalities()                            # modulated: the conv weights
        inputs = {"audio": torch.randn(m, 1, 32, 48, generator=g), "visual": torch.randn(m, 1, 3, 32, 32, generator=g)}
        labels = torch.randint(0, C, (m,), generator=g)

        def forward(i):
            return av_output(model(i["audio"], i["visual"]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    per_sample = _per_sample_grads(model, side, inputs, labels, forward)
    model.load_state_dict(state)                             # BatchNorm's running stats as before
    h, gbar = _noise(Balancer("ge", side, ge_noise="paper"), side, forward, inputs, labels)
    torch.testing.assert_close(per_sample.mean(0), gbar, rtol=1e-5, atol=1e-6 * gbar.abs().max().item())
    want = math.sqrt(m / (m - 1)) / m * ((per_sample - per_sample.mean(0)) * z.double()[:, None]).sum(0)
    torch.testing.assert_close(h, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_paper_noise_has_the_batch_covariance():
    """Drawn z (the step generators, new per step): over N draws on one batch, the empirical covariance
    of h equals S/m, S the unbiased covariance of the naive per-sample gradients, and h has mean 0.

    Tolerance: the relative Frobenius error of a sample covariance of N Gaussian draws has standard
    deviation about sqrt((tr(Sigma)^2/||Sigma||_F^2 + 1) / N); we allow 4 of them."""
    m, n_draws = 8, 3000
    model, side = _linear()
    inputs, labels = _data(m, torch.Generator().manual_seed(2))
    per_sample = _per_sample_grads(model, side, inputs, labels)
    centred = per_sample - per_sample.mean(0)
    want = centred.T @ centred / (m - 1) / m
    balancer = Balancer("ge", side, ge_noise="paper", seed=5)
    hs = torch.stack([_noise(balancer, side, model, inputs, labels)[0] for _ in range(n_draws)])
    emp = hs.T @ hs / n_draws
    sd = math.sqrt((torch.trace(want) ** 2 / (want ** 2).sum() + 1).item() / n_draws)
    err = ((emp - want).norm() / want.norm()).item()
    assert err < 4 * sd, (err, sd)
    assert hs.mean(0).norm().item() < 4 * math.sqrt(torch.trace(want).item() / n_draws)
    # every draw lies in the span of the centred per-sample gradients (rank m - 1 of d = 30), unlike
    # the official code's noise, which is isotropic within each tensor
    basis, _ = torch.linalg.qr(centred.T)
    assert (hs - hs @ basis @ basis.T).norm().item() < 1e-6 * hs.norm().item()


def test_paper_noise_shrinks_as_one_over_the_batch_size():
    """Fresh batches of m samples and fresh z: m * E||h||^2 = tr(Sigma) for every m (Sigma: the
    covariance of one sample's gradient over the data, from 4000 naive per-sample gradients), so
    E||h||^2 falls as 1/m. The biased covariance (without m/(m-1)) fails this at m = 2."""
    model, side = _linear()
    pop = _per_sample_grads(model, side, *_data(4000, torch.Generator().manual_seed(3)))
    trace = ((pop - pop.mean(0)) ** 2).sum(1).mean().item() * 4000 / 3999
    balancer = Balancer("ge", side, ge_noise="paper", seed=9)
    g = torch.Generator().manual_seed(4)
    means = {}
    for m, n_draws in ((2, 2500), (8, 1200), (32, 600)):
        sq = torch.tensor([_noise(balancer, side, model, *_data(m, g))[0].pow(2).sum().item() for _ in range(n_draws)])
        ratio, se = (m * sq.mean() / trace).item(), (m * sq.std() / trace).item() / math.sqrt(n_draws)
        assert abs(ratio - 1) < 4 * se, (m, ratio, se)
        means[m] = sq.mean().item()
        if m == 2:                       # the biased estimate would be (m-1)/m = 1/2 of it
            assert abs(ratio * (m - 1) / m - 1) > 4 * se
    assert means[2] / means[32] == pytest.approx(16, rel=0.3)


def test_paper_noise_under_ddp_uses_the_global_batch(monkeypatch):
    """Two ranks emulated in one process: each rank's z-weighted gradient sum, sum z and count are
    summed over ranks, and gbar is the DDP-averaged gradient; rank 0's h equals one process's h on
    the whole batch with the ranks' z concatenated."""
    m = 8
    z = torch.linspace(-1.0, 1.7, m)
    model, side = _linear()
    inputs, labels = _data(m, torch.Generator().manual_seed(6))
    params = _encoder_params(side)

    def prepared(rows, z_rows, reduce):
        noise = PaperNoise()
        monkeypatch.setattr(PaperNoise, "draw", staticmethod(lambda n, step: z_rows.clone()))
        out = model({u: x[rows] for u, x in inputs.items()})
        per = F.cross_entropy(out.logits, labels[rows], reduction="none")
        noise.prepare(per, params, Step(side, labels[rows], 0, reduce))
        return noise

    seen = []
    prepared(slice(4, 8), z[4:], lambda t: seen.append(t.clone()))        # rank 1's own vector
    rank0 = prepared(slice(0, 4), z[:4], lambda t: t.add_(seen[0]))       # rank 0 after the all-reduce
    whole = prepared(slice(0, 8), z, None)
    out = model(inputs)
    for p in params:
        p.grad = None
    F.cross_entropy(out.logits, labels).backward()                         # gbar of the global batch
    grads = [p.grad.clone() for p in params]
    rank0.apply(params, [None] * len(params))
    h0 = [p.grad - g for p, g in zip(params, grads)]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    whole.apply(params, [None] * len(params))
    for a, p, g in zip(h0, params, grads):
        torch.testing.assert_close(a, p.grad - g, rtol=1e-5, atol=1e-7)


def test_paper_noise_scales_after_ogm_and_code_noise_is_unchanged():
    """ogm-ge with paper noise: g <- k g + h (h from the unscaled per-sample gradients); the default
    stays the code's noise (the same draws as before this option existed)."""
    model, side = _linear()
    inputs, labels = _data(16, torch.Generator().manual_seed(8))
    params = _encoder_params(side)
    noise_only = Balancer("ge", side, ge_noise="paper", seed=3)
    h, gbar = _noise(noise_only, side, model, inputs, labels)
    both = Balancer("ogm-ge", side, alpha=0.9, ge_noise="paper", seed=3)
    out = model(inputs)
    loss = both.loss(out, labels)
    for p in params:
        p.grad = None
    loss.backward()
    stats = both.after_backward(out, labels)
    after = torch.cat([p.grad.flatten() for p in params]).double()
    k = torch.cat([torch.full((p.numel(),), stats["k_a" if i < 2 else "k_v"], dtype=torch.float64)
                   for i, p in enumerate(params)])
    assert min(stats["k_a"], stats["k_v"]) < 1
    torch.testing.assert_close(after, k * gbar + h, rtol=1e-5, atol=1e-7)
    assert Balancer("ge", side).method.ge_noise == "code"
