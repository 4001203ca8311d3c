"""OGM-GE and its ablations against a naive per-sample reference (paper eqs. 8-10, 16)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ogmge_train import modulation, names
from ogmge_train.errors import ConfigError
from ogmge_train.models import FUSIONS, av_output, build_model
from ogmge_train.modulation import base
from ogmge_train.plugin import Balancer

B, C, ALPHA = 8, 5, 0.6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _step(fusion="concat", arch="small", seed=0):
    """A model after one forward/backward on a random batch: (model, out, labels)."""
    torch.manual_seed(seed)
    model = build_model(arch, fusion, C)
    audio, visual = torch.randn(B, 1, 32, 48), torch.randn(B, 1, 3, 32, 32)
    labels = torch.randint(0, C, (B,))
    out = model(audio, visual)
    F.cross_entropy(out.logits, labels).backward()
    return model, out, labels


def _copy(model):
    """A deep copy with the gradients (deepcopy drops them)."""
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    return twin


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _reference_coefficients(model, out, labels, alpha):
    """Per-sample Python loop, float64, unimodal logits rebuilt from the head's parameters."""
    head = model.head.double()
    fa, fv = out.feat_a.detach().double(), out.feat_v.detach().double()

    def unimodal(a, v):
        if model.fusion == "concat":
            w, b = head.fc.weight, head.fc.bias
            return w[:, : a.numel()] @ a + b / 2, w[:, a.numel() :] @ v + b / 2
        if model.fusion == "sum":
            return head.fc_a.weight @ a + head.fc_a.bias, head.fc_v.weight @ v + head.fc_v.bias
        # film / gated: the head with the other modality replaced by its running mean
        return head.fuse(a[None], head.mean_v[None])[0], head.fuse(head.mean_a[None], v[None])[0]

    s_a = s_v = 0.0
    with torch.no_grad():
        for i in range(len(labels)):
            la, lv = unimodal(fa[i], fv[i])
            s_a += torch.softmax(la, 0)[labels[i]].item()
            s_v += torch.softmax(lv, 0)[labels[i]].item()
    model.head.float()
    rho_v = s_v / s_a
    rho_a = 1 / rho_v

    def k(rho):
        return 1 - math.tanh(alpha * rho) if rho > 1 else 1.0
    return {"rho_a": rho_a, "rho_v": rho_v, "k_a": k(rho_a), "k_v": k(rho_v)}


def _build(name, **kw):
    kw = {"alpha": ALPHA, "start_epoch": 0, "end_epoch": 10, **kw}
    return modulation.build(name, **kw)


def _after(method, model, out, labels, *, epoch=0, all_reduce=None, generator=None, scope="conv"):
    """``after_backward`` through the contract: the model side of ``model`` and a Step."""
    step = modulation.Step(model.modalities(scope), labels, epoch, all_reduce, generator)
    return method.after_backward(av_output(out), step)


def _drop(method, a, v, training=True):
    out = method.transform_features({"audio": a, "visual": v}, training=training)
    return out["audio"], out["visual"]


def _modulated(model, scope="conv"):
    return {m: dict(model.modulated_parameters(m, scope)) for m in ("audio", "visual")}


@pytest.mark.parametrize("fusion", FUSIONS)
def test_coefficients_match_per_sample_reference(fusion):
    model, out, labels = _step(fusion)
    expected = _reference_coefficients(model, out, labels, ALPHA)
    stats = _after(_build("ogm"), model, out, labels, epoch=0)
    assert set(stats) == set(base.STAT_KEYS)
    for key in base.STAT_KEYS:
        assert stats[key] == pytest.approx(expected[key], abs=1e-6), key
    assert min(stats["k_a"], stats["k_v"]) < 1.0 == max(stats["k_a"], stats["k_v"])


def test_coefficients_on_known_scores():
    rho, k = base.coefficients(torch.tensor([1.0, 3.0], dtype=torch.float64), 0.5)
    assert rho.tolist() == pytest.approx([1 / 3, 3.0])
    assert k.tolist() == pytest.approx([1.0, 1 - math.tanh(1.5)])
    rho, k = base.coefficients(torch.tensor([2.0, 1.0], dtype=torch.float64), 0.5)
    assert k.tolist() == pytest.approx([1 - math.tanh(1.0), 1.0])


def test_scores_are_detached():
    model, out, labels = _step()
    assert out.logits_a.requires_grad
    assert not base.unimodal_scores({"audio": out.logits_a, "visual": out.logits_v}, ("audio", "visual"),
                                    labels).requires_grad


def test_ogm_scales_exactly_the_modulated_gradients():
    model, out, labels = _step()
    before = _grads(model)
    stats = _after(_build("ogm"), model, out, labels, epoch=3)
    mods = _modulated(model)
    for name, p in model.named_parameters():
        if name in mods["audio"]:
            assert torch.equal(p.grad, before[name] * stats["k_a"]), name
        elif name in mods["visual"]:
            assert torch.equal(p.grad, before[name] * stats["k_v"]), name
        else:  # head, BatchNorm affine parameters
            assert torch.equal(p.grad, before[name]), name
    assert any(not n.startswith("head") for n in before if n not in mods["audio"] and n not in mods["visual"])


@pytest.mark.parametrize("name", ["ogm-ge", "ge"])
def test_ge_noise_replays_from_the_generator(name):
    """g <- k g + std(g) z; z: one draw from the generator, in parameter order (audio, then visual)."""
    model, out, labels = _step()
    before = _grads(model)
    stats = _after(_build(name), model, out, labels, epoch=0, generator=torch.Generator().manual_seed(7))
    if name == "ge":
        assert stats["k_a"] == stats["k_v"] == 1.0
    mods = _modulated(model)
    order = [(m, n) for m in ("audio", "visual") for n in mods[m]]
    z = torch.randn(sum(before[n].numel() for _, n in order), generator=torch.Generator().manual_seed(7))
    offset = 0
    for modality, pname in order:
        k = stats["k_a"] if modality == "audio" else stats["k_v"]
        g = before[pname]
        expected = g * k + g.std() * z[offset : offset + g.numel()].view_as(g)
        offset += g.numel()
        torch.testing.assert_close(mods[modality][pname].grad, expected, rtol=1e-5, atol=1e-6 * g.abs().max().item())
    for pname, p in model.named_parameters():
        if pname not in mods["audio"] and pname not in mods["visual"]:
            assert torch.equal(p.grad, before[pname]), pname


@pytest.mark.parametrize("name", ["ogm-ge", "ge"])
def test_ge_noise_has_the_gradient_std(name):
    model, out, labels = _step()
    before = _grads(model)
    stats = _after(_build(name), model, out, labels, epoch=0)
    mods = _modulated(model)
    big = [(m, n) for m in mods for n, p in mods[m].items() if p.numel() >= 100_000]
    assert len(big) == 2  # the last 128x128x3x3 conv of each small encoder
    for modality, pname in big:
        k = stats["k_a"] if modality == "audio" else stats["k_v"]
        noise = mods[modality][pname].grad - k * before[pname]
        assert noise.std().item() == pytest.approx(before[pname].std().item(), rel=0.05)
        assert abs(noise.mean().item()) < 0.05 * before[pname].std().item()


def test_modulation_only_in_active_epochs():
    for epoch, active in ((1, False), (2, True), (4, True), (5, False)):
        model, out, labels = _step()
        before = _grads(model)
        stats = _after(_build("ogm-ge", start_epoch=2, end_epoch=4), model, out, labels, epoch=epoch)
        changed = any(not torch.equal(p.grad, before[n]) for n, p in model.named_parameters())
        assert changed == active, epoch
        assert (min(stats["k_a"], stats["k_v"]) < 1) == active
        assert stats["rho_v"] * stats["rho_a"] == pytest.approx(1.0)  # rho is measured regardless


def test_none_reports_rho_and_leaves_gradients():
    model, out, labels = _step()
    before = _grads(model)
    stats = _after(_build("none"), model, out, labels, epoch=0)
    expected = _reference_coefficients(model, out, labels, ALPHA)
    assert stats["rho_v"] == pytest.approx(expected["rho_v"], abs=1e-6)
    assert stats["k_a"] == stats["k_v"] == 1.0
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())


def test_scope_all_modulates_every_encoder_parameter():
    model, out, labels = _step()
    before = _grads(model)
    stats = _after(_build("ogm"), model, out, labels, epoch=0, scope="all")
    for name, p in model.named_parameters():
        if name.startswith("audio_encoder."):
            assert torch.equal(p.grad, before[name] * stats["k_a"]), name
        elif name.startswith("visual_encoder."):
            assert torch.equal(p.grad, before[name] * stats["k_v"]), name
        else:
            assert torch.equal(p.grad, before[name]), name
    assert any(p.dim() == 1 for _, p in model.modulated_parameters("audio", "all"))


def test_all_reduce_sums_scores_before_rho():
    model, out, labels = _step()
    own = base.unimodal_scores({"audio": out.logits_a, "visual": out.logits_v}, ("audio", "visual"), labels)
    other_rank = torch.tensor([5.0, 1.0], dtype=torch.float64)
    seen = []

    def all_reduce(t):
        seen.append(t.clone())
        t.add_(other_rank)

    stats = _after(_build("ogm"), model, out, labels, epoch=0, all_reduce=all_reduce)
    assert len(seen) == 1 and seen[0].shape == (2,)
    total = own + other_rank
    rho_a = (total[0] / total[1]).item()
    assert rho_a > 1
    assert stats["rho_a"] == pytest.approx(rho_a, rel=1e-12)
    assert stats["k_a"] == pytest.approx(1 - math.tanh(ALPHA * rho_a), rel=1e-12)
    assert stats["k_v"] == 1.0


def test_identical_generators_give_identical_updates():
    model, out, labels = _step()
    twin = _copy(model)
    method = _build("ogm-ge")
    _after(method, model, out, labels, epoch=0, generator=torch.Generator().manual_seed(3))
    _after(method, twin, out, labels, epoch=0, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), twin.parameters()))
    third, out3, labels3 = _step()
    _after(method, third, out3, labels3, epoch=0, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(third.audio_encoder.trunk.body[0].weight.grad, model.audio_encoder.trunk.body[0].weight.grad)


def test_modalities_find_their_parameters_in_a_copy():
    """Parameters are recorded by name: a copy's model side modulates the copy's gradients."""
    model, out, labels = _step()
    side = model.modalities()
    twin = side.copy()
    assert twin.model is not model
    for u in ("audio", "visual"):
        assert [p.shape for p in twin.modulated(u)] == [p.shape for p in side.modulated(u)]
        assert not any(p is q for p, q in zip(twin.params(u), side.params(u)))
    assert {n for n, _ in model.modulated_parameters("audio")} == {
        n for n, p in twin.model.named_parameters() if any(p is q for q in twin.modulated("audio"))}
    with pytest.raises(ConfigError, match="not parameters of the model"):
        base.Modalities(model, {"audio": build_model("small", "concat", C).audio_encoder})


@pytest.mark.parametrize("fusion", ["film", "gated"])
def test_nonadditive_fusions_train_with_ogm_ge(fusion):
    torch.manual_seed(1)
    model = build_model("small", fusion, C)
    start = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    method = _build("ogm-ge")
    gen = torch.Generator().manual_seed(0)
    audio, visual = torch.randn(B, 1, 32, 48), torch.randn(B, 1, 3, 32, 32)
    labels = torch.randint(0, C, (B,))
    for _ in range(4):
        opt.zero_grad()
        out = model(audio, visual)
        loss = F.cross_entropy(out.logits, labels)
        loss.backward()
        stats = _after(method, model, out, labels, epoch=0, generator=gen)
        opt.step()
        assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in stats.values())
    changed = [n for n, v in model.state_dict().items() if not torch.equal(v, start[n])]
    assert any(n.startswith("audio_encoder.") for n in changed)
    assert any(n.startswith("visual_encoder.") for n in changed)
    assert any(n.startswith("head.fc_out") for n in changed)


def test_unimodal_model_is_left_alone():
    torch.manual_seed(0)
    model = build_model("small", "concat", C, modality="audio")
    labels = torch.randint(0, C, (B,))
    out = model(torch.randn(B, 1, 32, 48), None)
    F.cross_entropy(out.logits, labels).backward()
    before = _grads(model)
    balancer = Balancer("ogm-ge", model.modalities(), alpha=ALPHA)      # one modality: nothing to balance
    assert balancer.method.name == "none" and balancer.name == "ogm-ge"
    stats = balancer.after_backward(av_output(out), labels)
    assert stats == {"rho_a": 1.0, "k_a": 1.0}
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())


def test_modality_drop():
    method = _build("modality-drop", drop_p=0.4)
    assert method.feature_hook(training=True) is not None
    assert _build("ogm-ge").feature_hook(training=True) is None
    torch.manual_seed(0)
    a, v = torch.rand(4000, 16) + 0.1, torch.rand(4000, 16) + 0.1
    da, dv = _drop(method, a, v)
    gone_a, gone_v = (da == 0).all(1), (dv == 0).all(1)
    assert not (gone_a & gone_v).any()                       # never both
    assert torch.equal(da[~gone_a], a[~gone_a]) and torch.equal(dv[~gone_v], v[~gone_v])  # no rescaling
    assert (gone_a | gone_v).float().mean().item() == pytest.approx(0.4, abs=0.03)
    assert gone_a.float().mean().item() == pytest.approx(0.2, abs=0.03)
    ea, ev = _drop(method, a, v, training=False)
    assert ea is a and ev is v
    # through the model: the hook acts before fusion, gradients are not modulated
    model, out, labels = _step()
    before = _grads(model)
    assert _after(method, model, out, labels, epoch=0)["k_a"] == 1.0
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())


def test_registry():
    # one list of names (torch-free) for config, CLI and the method classes
    assert modulation.NAMES == names.METHODS == tuple(modulation.METHODS)
    assert all(_build(n).name == n for n in modulation.NAMES)
    # the fusion rule has one owner: a class's ``fusions`` is its names.METHOD_FUSIONS entry
    assert {n: cls.fusions for n, cls in modulation.METHODS.items()} == {
        n: names.METHOD_FUSIONS.get(n) for n in names.METHODS}
    from ogmge_train.config import CHOICES
    assert CHOICES["modulation"] is names.METHODS and CHOICES["fusion"] is names.FUSIONS
    with pytest.raises(ConfigError, match="modulation"):
        _build("no-such-method")
    with pytest.raises(ConfigError, match="scope"):
        build_model("small", "concat", C).modalities("bn")
    with pytest.raises(ConfigError, match="--fusion concat or sum"):
        _build("opm", fusion="film")
    assert isinstance(_build("opm", fusion="sum"), modulation.METHODS["opm"])


@pytest.mark.parametrize("which", ["audio", "visual"])
def test_modality_drop_of_one_named_modality(which):
    """The paper's two Table 2 rows: the named modality is the one dropped, with probability drop_p."""
    method = _build("modality-drop", drop_p=0.3, drop_modality=which)
    torch.manual_seed(1)
    a, v = torch.rand(4000, 16) + 0.1, torch.rand(4000, 16) + 0.1
    da, dv = _drop(method, a, v)
    gone, kept = ((da, dv) if which == "audio" else (dv, da))
    assert torch.equal(kept, a if which == "visual" else v)          # the other is never touched
    assert (gone == 0).all(1).float().mean().item() == pytest.approx(0.3, abs=0.03)
    with pytest.raises(ConfigError, match="drop_modality"):
        Balancer(_build("modality-drop", drop_modality="both"), build_model("small", "concat", C).modalities())


def _ddp_worker(rank, world, port, result_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)                       # same initial weights on both ranks
    model = DDP(build_model("small", "concat", C))
    side = model.module.modalities()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = _build("ogm-ge")
    gen = torch.Generator().manual_seed(11)    # same GE noise on both ranks
    data = torch.Generator().manual_seed(100 + rank)  # different samples per rank
    stats = []
    for _ in range(3):
        audio, visual = torch.randn(4, 1, 32, 48, generator=data), torch.randn(4, 1, 3, 32, 32, generator=data)
        labels = torch.randint(0, C, (4,), generator=data)
        opt.zero_grad()
        out = model(audio, visual)
        F.cross_entropy(out.logits, labels).backward()
        step = modulation.Step(side, labels, 0, dist.all_reduce, gen)
        stats.append(method.after_backward(av_output(out), step))
        opt.step()
    torch.save({"params": [p.detach() for p in model.module.parameters()], "stats": stats}, f"{result_path}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_stay_identical(tmp_path):
    """Two gloo ranks on different data: same k (all-reduced scores), same noise, same weights."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "r")), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"r.{i}", weights_only=True) for i in range(2))
    assert r0["stats"] == r1["stats"]
    assert all(torch.equal(p, q) for p, q in zip(r0["params"], r1["params"]))
