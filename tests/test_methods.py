"""OPM / OPM-GE and PMR: one training step against naive references written from the equations
(per-sample Python loops in float64, weights shared with the model under test)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ogmge_train import modulation
from ogmge_train.models import av_output, build_model
from ogmge_train.modulation import opm as opm_mod
from ogmge_train.plugin import Balancer

B, C = 8, 5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 1, 32, 48, generator=g), torch.randn(B, 1, 3, 32, 32, generator=g),
            torch.randint(0, C, (B,), generator=g))


def _model(fusion="concat", seed=0):
    torch.manual_seed(seed)
    return build_model("small", fusion, C)


def _inputs(audio, visual):
    return {"audio": audio, "visual": visual}


def _step(side, labels, epoch=0, **kw):
    return modulation.Step(side, labels, epoch, **kw)


def _softmax_true(logits, y):
    z = [math.exp(v - max(logits)) for v in logits]
    return z[y] / sum(z)


# ---------------------------------------------------------------- OPM

def _reference_q(model, fa, fv, labels, q_base, lam):
    """s_u per sample in float64 from the head's weights, then q_u as the TPAMI equations."""
    s = [0.0, 0.0]
    with torch.no_grad():
        for i in range(B):
            if model.fusion == "concat":
                w, b = model.head.fc.weight.double(), model.head.fc.bias.double()
                d = fa.shape[1]
                la = (w[:, :d] @ fa[i].double() + b / 2).tolist()
                lv = (w[:, d:] @ fv[i].double() + b / 2).tolist()
            else:
                la = (model.head.fc_a.weight.double() @ fa[i].double() + model.head.fc_a.bias.double()).tolist()
                lv = (model.head.fc_v.weight.double() @ fv[i].double() + model.head.fc_v.bias.double()).tolist()
            s[0] += _softmax_true(la, int(labels[i]))
            s[1] += _softmax_true(lv, int(labels[i]))
    q = []
    for mine, other in ((s[0], s[1]), (s[1], s[0])):
        excess = math.tanh(max(mine / other - 1, 0.0))
        q.append(min(max(q_base * (1 + lam * excess), 0.0), 1.0) if excess > 0 else 0.0)
    return q


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_opm_step_matches_reference(fusion):
    """q from the undropped features; dropped samples zeroed, both features scaled by 1/(1-theta);
    the gradient of CE(fused) equals a reference forward with the same mask."""
    model = _model(fusion)
    audio, visual, labels = _batch()
    method = modulation.build("opm", alpha=0.0, start_epoch=0, end_epoch=None, fusion=fusion,
                              opm_q_base=0.6, opm_lam=0.9, opm_p_exe=1.0)
    twin = copy.deepcopy(model)
    side = model.modalities()
    step = _step(side, labels)
    torch.manual_seed(3)
    out = side.run(_inputs(audio, visual), method.feature_hook(True, step))
    method.loss(out, step).backward()

    # reference: the twin's own features, q by the per-sample loop, the mask read off the output
    fa, fv = twin.audio_encoder(audio), twin.visual_encoder(visual)
    q = _reference_q(twin, fa.detach(), fv.detach(), labels, 0.6, 0.9)
    assert method.last_q.tolist() == pytest.approx(q, rel=1e-5)
    assert min(q) == 0.0 and max(q) > 0.6                      # only the dominant one drops
    keep = [(~(out.features[u] == 0).all(1)).float() for u in ("audio", "visual")]
    dominant = 0 if q[0] > 0 else 1
    assert keep[1 - dominant].all() and not keep[dominant].all()
    theta = (fa.shape[1] * q[0] + fv.shape[1] * q[1]) / (fa.shape[1] + fv.shape[1])
    ra = fa * keep[0][:, None] / (1 - theta)
    rv = fv * keep[1][:, None] / (1 - theta)
    logits, _, _ = twin.head(ra, rv)
    F.cross_entropy(logits, labels).backward()
    for (name, p), (_, r) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_opm_drop_rates_and_p_exe():
    """Over many steps: a step drops with probability p_exe; a sample loses the dominant modality
    with probability q."""
    torch.manual_seed(0)
    fa, fv = torch.rand(2000, 16) + 0.1, torch.rand(2000, 16) + 0.1
    q = torch.tensor([0.0, 0.4])
    drops, rate = 0, []
    for _ in range(300):
        if torch.rand(()) < 0.7:
            drops += 1
            keep = (torch.rand(2, 2000, 1) >= q.view(2, 1, 1)).float()
            dropped = opm_mod.drop(_inputs(fa, fv), q, keep)
            a, v = dropped["audio"], dropped["visual"]
            rate.append((v == 0).all(1).float().mean().item())
            assert not (a == 0).all(1).any()
            assert torch.allclose(a, fa / (1 - 0.2))                  # theta = (16*0 + 16*0.4)/32
    assert drops / 300 == pytest.approx(0.7, abs=0.08)
    assert sum(rate) / len(rate) == pytest.approx(0.4, abs=0.01)


def test_opm_inactive_outside_epochs_and_at_eval():
    model = _model()
    _, _, labels = _batch()
    method = modulation.build("opm", alpha=0.0, start_epoch=6, end_epoch=None)
    step = _step(model.modalities(), labels, epoch=5)
    features = _inputs(torch.rand(B, 128), torch.rand(B, 128))
    assert method.transform_features(features, training=True, step=step) is features
    step.epoch = 6
    assert method.transform_features(features, training=False, step=step) is features


def test_opm_ge_adds_noise_without_scaling():
    """opm-ge = OPM's forward + GE noise (std of each conv-weight gradient), k = 1."""
    model = _model()
    audio, visual, labels = _batch()
    out = model(audio, visual)
    F.cross_entropy(out.logits, labels).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    method = modulation.build("opm-ge", alpha=0.5, start_epoch=0, end_epoch=None)
    stats = method.after_backward(av_output(out), _step(model.modalities(), labels,
                                                        generator=torch.Generator().manual_seed(5)))
    assert stats["k_a"] == stats["k_v"] == 1.0
    order = [n for m in ("audio", "visual") for n, _ in model.modulated_parameters(m)]
    z = torch.randn(sum(before[n].numel() for n in order), generator=torch.Generator().manual_seed(5))
    params, off = dict(model.named_parameters()), 0
    for n in order:
        g = before[n]
        torch.testing.assert_close(params[n].grad, g + g.std() * z[off:off + g.numel()].view_as(g),
                                   rtol=1e-5, atol=1e-6 * g.abs().max().item())
        off += g.numel()


# ---------------------------------------------------------------- PMR

def _start(side, batches, epoch=0, steps=10):
    return modulation.EpochStart(side, epoch, steps, lambda n: iter([(_inputs(a, v), y) for a, v, y in batches[:n]]))


def _pmr(**kw):
    method = modulation.build("pmr", alpha=0.0, start_epoch=kw.pop("start_epoch", 0),
                              end_epoch=kw.pop("end_epoch", None), **kw)
    method.setup(_model().modalities())
    return method


def test_pmr_prototypes_are_class_means_then_momentum():
    model = _model("gated")
    batches = [_batch(s) for s in range(3)]
    method = _pmr(pmr_momentum=0.2)
    method.begin_epoch(_start(model.modalities(), batches, steps=25))          # max(1, 25 // 10) = 2 batches
    model.eval()
    with torch.no_grad():
        feats = [model(a, v) for a, v, _ in batches[:2]]
    labels = torch.cat([y for _, _, y in batches[:2]])
    fa = torch.cat([o.feat_a for o in feats]).double()
    fv = torch.cat([o.feat_v for o in feats]).double()
    for c in range(C):
        rows = [i for i in range(len(labels)) if labels[i] == c]
        want_a = sum(fa[i] for i in rows) / len(rows) if rows else torch.zeros(fa.shape[1], dtype=torch.float64)
        want_v = sum(fv[i] for i in rows) / len(rows) if rows else torch.zeros(fv.shape[1], dtype=torch.float64)
        torch.testing.assert_close(method.protos["audio"][c].double(), want_a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(method.protos["visual"][c].double(), want_v, rtol=1e-5, atol=1e-6)
    old_a = method.protos["audio"].clone()
    with torch.no_grad():                                           # change the model: new means
        for p in model.audio_encoder.parameters():
            p.mul_(1.1)
    method.begin_epoch(_start(model.modalities(), batches, epoch=1, steps=25))
    with torch.no_grad():
        new_a = torch.cat([model(a, v).feat_a for a, v, _ in batches[:2]]).double()
    for c in range(C):
        rows = [i for i in range(len(labels)) if labels[i] == c]
        if rows:
            want = 0.8 * (sum(new_a[i] for i in rows) / len(rows)) + 0.2 * old_a[c].double()
            torch.testing.assert_close(method.protos["audio"][c].double(), want, rtol=1e-5, atol=1e-6)
        else:                                                       # unseen class: kept
            assert torch.equal(method.protos["audio"][c], old_a[c])


@pytest.mark.parametrize("fusion", ["concat", "film"])
def test_pmr_loss_and_gradients_match_reference(fusion):
    """loss = CE(fused) + beta CE(-dist_a) + lam CE(-dist_v): the weaker modality (lower summed
    prototype softmax of the true class) gets weight alpha."""
    model = _model(fusion)
    audio, visual, labels = _batch()
    method = _pmr(pmr_alpha=0.7)
    g = torch.Generator().manual_seed(9)
    method.protos = {"audio": torch.rand(C, 128, generator=g), "visual": torch.rand(C, 128, generator=g)}
    twin = copy.deepcopy(model)
    step = _step(model.modalities(), labels)
    out = av_output(model(audio, visual))
    loss = method.loss(out, step)
    loss.backward()
    stats = method.after_backward(out, step)

    ref = twin(audio, visual)
    sims, scores = [], []
    for feat, protos in ((ref.feat_a, method.protos["audio"]), (ref.feat_v, method.protos["visual"])):
        rows = [torch.stack([-torch.sqrt(((feat[i] - protos[c]) ** 2).sum()) for c in range(C)]) for i in range(B)]
        sim = torch.stack(rows)
        sims.append(sim)
        scores.append(sum(_softmax_true(sim[i].tolist(), int(labels[i])) for i in range(B)))
    r = scores[0] / scores[1]
    beta, lam = (0.7, 0.0) if r < 1 else (0.0, 0.7) if r > 1 else (0.0, 0.0)
    ref_loss = (F.cross_entropy(ref.logits, labels) + beta * F.cross_entropy(sims[0], labels)
                + lam * F.cross_entropy(sims[1], labels))
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert stats["rho_a"] == pytest.approx(r, rel=1e-5)
    assert (stats["k_a"], stats["k_v"]) == pytest.approx((beta, lam))
    assert beta + lam == pytest.approx(0.7)
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_pmr_state_round_trips_and_is_plain_outside_epochs():
    model = _model()
    audio, visual, labels = _batch()
    method = _pmr(start_epoch=2, end_epoch=3)
    method.begin_epoch(_start(model.modalities(), [_batch(s) for s in range(2)]))
    twin = _pmr(start_epoch=2, end_epoch=3)
    assert set(method.state_dict()) == {"proto_a", "proto_v"}     # the checkpoint's names
    twin.load_state_dict(method.state_dict())
    assert all(torch.equal(twin.protos[u], method.protos[u]) for u in ("audio", "visual"))
    out = av_output(model(audio, visual))
    step = _step(model.modalities(), labels, epoch=1)                 # outside [2, 3]: plain CE
    assert torch.equal(method.loss(out, step), F.cross_entropy(out.logits, labels))


# ---------------------------------------------------------------- MMPareto

def _min_norm_by_search(g1, g2):
    """argmin_c ||c g1 + (1 - c) g2|| on [0, 1] by ternary search (no closed form)."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if (m1 * g1 + (1 - m1) * g2).norm() < (m2 * g1 + (1 - m2) * g2).norm():
            hi = m2
        else:
            lo = m1
    return (lo + hi) / 2


def test_mmpareto_weights_are_the_min_norm_point_when_gradients_conflict():
    from ogmge_train.modulation.mmpareto import pareto_weights
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        g1 = torch.randn(50, generator=g, dtype=torch.float64)
        g2 = -0.5 * g1 + torch.randn(50, generator=g, dtype=torch.float64) * 0.5   # conflicting
        cos, w = pareto_weights(g1, g2)
        assert cos.item() == pytest.approx((g1 @ g2 / (g1.norm() * g2.norm())).item())
        assert cos.item() < 0 and w.item() == pytest.approx(_min_norm_by_search(g1, g2), abs=1e-6)
    cos, w = pareto_weights(g1, g1 + 0.1)
    assert cos.item() > 0 and w.item() == 0.5


@pytest.mark.parametrize("fusion,conflict", [("concat", False), ("gated", False), ("concat", True)])
def test_mmpareto_step_matches_reference(fusion, conflict):
    torch.manual_seed(0)
    model = build_model("small", fusion, C)
    method = modulation.build("mmpareto", alpha=0.0, start_epoch=0, end_epoch=None)
    side = Balancer(method, model.modalities()).modalities          # adds model.aux_heads
    if conflict:  # auxiliary heads opposite to the fused head: unimodal and multimodal gradients conflict
        with torch.no_grad():
            d = model.audio_encoder.out_dim
            model.aux_heads["audio"].weight.copy_(-3 * model.head.fc.weight[:, :d])
            model.aux_heads["visual"].weight.copy_(-3 * model.head.fc.weight[:, d:])
    twin = copy.deepcopy(model)
    audio, visual, labels = _batch()
    step = _step(side, labels)
    out = side.run(_inputs(audio, visual))
    method.loss(out, step).backward()
    stats = method.after_backward(out, step)

    # reference: one backward per loss, gradients read off .grad, combined per the equations
    ref = twin(audio, visual)
    losses = [F.cross_entropy(ref.logits, labels), F.cross_entropy(twin.aux_heads["audio"](ref.feat_a), labels),
              F.cross_entropy(twin.aux_heads["visual"](ref.feat_v), labels)]
    per_loss = []
    for loss in losses:
        twin.zero_grad()
        loss.backward(retain_graph=True)
        per_loss.append({n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                         for n, p in twin.named_parameters()})
    twin.zero_grad()
    sum(losses).backward()
    expected = {n: p.grad.clone() for n, p in twin.named_parameters()}
    for modality, uni, key in (("audio", 1, "a"), ("visual", 2, "v")):
        names_ = [n for n, _ in twin.named_parameters() if n.startswith(f"{modality}_encoder.")]
        gm = torch.cat([per_loss[0][n].flatten() for n in names_]).double()
        gu = torch.cat([per_loss[uni][n].flatten() for n in names_]).double()
        cos = (gm @ gu / (gm.norm() * gu.norm())).item()
        w = 0.5 if cos > 0 else _min_norm_by_search(gm, gu)
        assert stats[f"cos_{key}"] == pytest.approx(cos, rel=1e-4)
        assert stats[f"w_{key}"] == pytest.approx(w, abs=1e-5)
        for n in names_:
            new = 2 * w * per_loss[0][n] + 2 * (1 - w) * per_loss[uni][n]
            r = (expected[n].norm() / new.norm()).item() if new.norm() > 0 else 1.0
            expected[n] = 1.5 * max(r, 1.0) * new
    if conflict:
        assert stats["cos_a"] < 0 and stats["cos_v"] < 0 and stats["w_a"] != 0.5
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-7, msg=n)


# ---------------------------------------------------------------- Gradient-Blending

def _keyed(n_batches=3, seed=0):
    out = []
    for s in range(n_batches):
        a, v, y = _batch(seed + s)
        out.append((a, v, y, [f"clip-{seed}-{s}-{i}" for i in range(B)]))
    return out


def test_gradient_blending_holdout_is_a_stable_fraction_of_keys():
    from ogmge_train.modulation.gradient_blending import held_out
    keys = [f"sample-{i}" for i in range(20000)]
    held = [held_out(k, 0.08) for k in keys]
    assert sum(held) / len(keys) == pytest.approx(0.08, abs=0.006)
    assert held == [held_out(k, 0.08) for k in keys]
    method = modulation.build("gradient-blending", alpha=0.0, start_epoch=0, end_epoch=None)
    rows = method.train_rows(keys[:100])
    assert rows.tolist() == [not h for h in held[:100]]
    all_held = [k for k, h in zip(keys, held) if h][:4]
    rows, weight = modulation.keep_rows(method.train_rows(all_held))   # no training sample in the batch:
    assert rows.tolist() == [True, False, False, False] and weight == 0.0  # one kept, with zero loss weight
    assert modulation.keep_rows(torch.tensor([False, True]))[1] == 1.0


def test_gradient_blending_weights_match_reference():
    """Each output's copy trained alone for S epochs with SGD; OGR = |dG / dO^2| from mean losses
    on the train part and the held-out part, before and after; normalised."""
    torch.manual_seed(0)
    model = build_model("small", "concat", C)
    data = _keyed()
    holdout = 0.3
    method = modulation.build("gradient-blending", alpha=0.0, start_epoch=0, end_epoch=None,
                              gb_super_epoch=2, gb_holdout=holdout)
    side = Balancer(method, model.modalities()).modalities          # adds model.aux_heads
    from ogmge_train.modulation.gradient_blending import held_out
    events = []
    start = modulation.EpochStart(side, 0, len(data), None,
                                  keyed_batches=lambda e: iter([(_inputs(a, v), y, k) for a, v, y, k in data]),
                                  make_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05), epochs=100,
                                  emit=events.append)
    twin_src = copy.deepcopy(model)
    method.begin_epoch(start)
    # progress: one unit per batch of the copies, 3 outputs x (2 training epochs + 2 loss passes)
    assert [e["done"] for e in events] == list(range(3 * 4 * len(data) + 1))
    assert {e["total"] for e in events} == {3 * 4 * len(data)} and events[-1]["eta_s"] == 0

    def losses(net, pick):
        net.eval()
        tr, ho = [], []
        with torch.no_grad():
            for a, v, y, keys in data:
                out = net(a, v)
                logits = pick(out)
                for i, k in enumerate(keys):
                    (ho if held_out(k, holdout) else tr).append(F.cross_entropy(logits[i:i + 1], y[i:i + 1]).item())
        return sum(tr) / len(tr), sum(ho) / len(ho)

    raw = []
    for which in ("fused", "audio", "visual"):
        net = copy.deepcopy(twin_src)

        def pick(o, net=net, which=which):          # the copy's own output (its own heads)
            if which == "fused":
                return o.logits
            return net.aux_heads[which](o.feat_a if which == "audio" else o.feat_v)
        lt0, lv0 = losses(net, pick)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        for _ in range(2):
            net.train()
            for a, v, y, keys in data:
                keep = [i for i, k in enumerate(keys) if not held_out(k, holdout)]
                weight = 1.0 if keep else 0.0
                keep = keep or [0]
                opt.zero_grad()
                (weight * F.cross_entropy(pick(net(a[keep], v[keep])), y[keep])).backward()
                opt.step()
        lt1, lv1 = losses(net, pick)
        g, o = lv1 - lv0, (lv1 - lt1) - (lv0 - lt0)
        raw.append(abs(g) / (o * o))
    want = [r / sum(raw) for r in raw]
    assert method.weights.tolist() == pytest.approx(want, rel=1e-3)
    assert sum(method.weights.tolist()) == pytest.approx(1.0)
    # the model itself was not trained by the estimate
    for (n, p), (_, q) in zip(model.named_parameters(), twin_src.named_parameters()):
        assert torch.equal(p, q), n

    # the blended loss and its gradient
    a, v, y, _ = data[0]
    out = model(a, v)
    loss = method.loss(av_output(out), _step(side, y))
    w = want
    ref = (w[0] * F.cross_entropy(out.logits, y) + w[1] * F.cross_entropy(model.aux_heads["audio"](out.feat_a), y)
           + w[2] * F.cross_entropy(model.aux_heads["visual"](out.feat_v), y))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-3)
    twin = modulation.build("gradient-blending", alpha=0.0, start_epoch=0, end_epoch=None)
    twin.load_state_dict(method.state_dict())
    assert torch.equal(twin.weights, method.weights)


def test_gradient_blending_estimates_every_super_epoch_only():
    method = modulation.build("gradient-blending", alpha=0.0, start_epoch=2, end_epoch=20, gb_super_epoch=3)
    assert [e for e in range(25) if method.due(e)] == [2, 5, 8, 11, 14, 17, 20]


# ---------------------------------------------------------------- AGM

@pytest.mark.parametrize("fusion", ["concat", "film"])
def test_agm_two_steps_match_reference(fusion):
    """Mono-modal responses from zeroed inputs (eval mode), scores -log p(y), k from the ratio
    against the running-mean target, conv-weight gradients scaled, clipping at 5."""
    torch.manual_seed(0)
    model = build_model("small", fusion, C)
    twin = copy.deepcopy(model)
    side = model.modalities()
    method = modulation.build("agm", alpha=0.0, start_epoch=0, end_epoch=None, agm_alpha=0.4)
    t = [0.0, 0.0]
    for it in (1, 2):
        audio, visual, labels = _batch(it)
        step = _step(side, labels, inputs=_inputs(audio, visual), step=it - 1)
        model.zero_grad()
        method.begin_step(step)
        out = side.run(_inputs(audio, visual))
        method.loss(out, step).backward()
        stats = method.after_backward(out, step)

        # reference
        twin.eval()
        with torch.no_grad():
            full = twin(audio, visual).logits
            v_only = twin(torch.zeros_like(audio), visual).logits
            a_only = twin(audio, torch.zeros_like(visual)).logits
        twin.train()
        s = []
        for m in (0.5 * (full - v_only), 0.5 * (full - a_only)):
            s.append(sum(-math.log(max(_softmax_true(m[i].tolist(), int(labels[i])), 1e-8)) for i in range(B)) / B)
        k = []
        for u in range(2):
            ratio = math.exp(2 * (s[u] - sum(s) / 2))
            target = math.exp(2 * (t[u] - sum(t) / 2))
            k.append(math.exp(0.4 * min(target - ratio, 7)))
        t = [t[u] * (it - 1) / it + s[u] / it for u in range(2)]
        assert (stats["k_a"], stats["k_v"]) == pytest.approx(k, rel=1e-5)
        assert method.train_scores == pytest.approx(t, rel=1e-6)
        twin.zero_grad()
        F.cross_entropy(twin(audio, visual).logits, labels).backward()
        convs = {n for m in ("audio", "visual") for n, _ in twin.modulated_parameters(m)}
        with torch.no_grad():
            for n, p in twin.named_parameters():
                if n in convs:
                    p.grad.mul_(k[0] if n.startswith("audio") else k[1])
            head = [p.grad for n, p in twin.named_parameters() if n.startswith("head.") and p.dim() == 2]
            if max(g.abs().max().item() for g in head) > 5:
                total = math.sqrt(sum((p.grad.double() ** 2).sum().item() for p in twin.parameters()))
                for p in twin.parameters():
                    p.grad.mul_(min(1.0, 5 / (total + 1e-6)))
        for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=n)
        with torch.no_grad():                     # same update on both, so step 2 starts equal
            for p, q in zip(model.parameters(), twin.parameters()):
                p.sub_(0.1 * p.grad)
                q.sub_(0.1 * q.grad)
    assert k != pytest.approx([1.0, 1.0])


def test_agm_clips_large_head_gradients():
    torch.manual_seed(0)
    model = build_model("small", "sum", C)
    audio, visual, labels = _batch()
    with torch.no_grad():
        bn = [m for m in model.audio_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]
        bn.weight.mul_(100)                       # huge audio features: head gradients beyond 5
        bn.bias.fill_(50.0)
    method = modulation.build("agm", alpha=0.0, start_epoch=0, end_epoch=None)
    step = _step(model.modalities(), labels, inputs=_inputs(audio, visual))
    method.begin_step(step)
    out = step.modalities.run(step.inputs)
    method.loss(out, step).backward()
    big = max(p.grad.abs().max().item() for p in model.head.parameters())
    method.after_backward(out, step)
    norm = math.sqrt(sum((p.grad.double() ** 2).sum().item() for p in model.parameters()))
    assert big > 5 and norm == pytest.approx(5.0, rel=1e-4)
