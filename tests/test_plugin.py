"""The plug-in API (README: Plug-in API): the README's own example model, our trainer's step, the
hooks issue-22's methods need (each proved by a test-only method), DDP, AMP, gradient accumulation
and a three-modality model."""
from __future__ import annotations

import copy
import math
import re
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ogmge_train import modulation
from ogmge_train import train as train_mod
from ogmge_train.config import resolve
from ogmge_train.errors import ConfigError
from ogmge_train.models import av_output, build_model
from ogmge_train.modulation.base import Method, StepResult, linear_heads, unit_stats
from ogmge_train.plugin import Balancer, Modalities, Output
from tests._helpers import REPO

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def readme_example() -> dict:
    """The README's plug-in example, run as written (it trains its model for 10 steps)."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- plugin-example -->\n```python\n(.*?)```", text, re.S)
    assert block, "README: no plug-in example block"
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(block.group(1), "README.md:plugin-example", "exec"), namespace)
    return namespace


def _grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


# ---------------------------------------------------------------- the README example and our step

def test_readme_example_trains_and_equals_the_trainers_step():
    """The README's model trained with OGM-GE through its own loop (after_backward between backward
    and step); from the same weights, optimizer state and batches, ``Balancer.train_step`` (the call
    ``ogmge_train.train`` makes for every batch) leaves the same gradients and parameters."""
    ns = readme_example()
    stats = ns["stats"]
    assert set(stats) == {"rho_a", "rho_v", "k_a", "k_v"}
    assert min(stats["k_a"], stats["k_v"]) < 1.0 == max(stats["k_a"], stats["k_v"])   # one modality slowed
    model, optimizer, balancer = ns["model"], ns["optimizer"], ns["balancer"]

    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    twin_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))   # its own momentum buffers
    ours = Balancer("ogm-ge", Modalities(twin, {"audio": twin.audio, "video": twin.video},
                                         forward=lambda m, inputs, hook: m(inputs, hook)), alpha=0.8)
    ours.load_state_dict(balancer.state_dict())          # same step counter: same GE noise generators
    torch.manual_seed(1)
    for _ in range(3):
        inputs, labels = ns["batch"]()
        ns["train_step"](inputs, labels)                   # the README's loop
        result = ours.train_step(inputs, labels, twin_opt)  # the trainer's step
        assert result is not None and result.updates == 1
        for g, h in zip(_grads(model), _grads(twin)):
            torch.testing.assert_close(g, h, rtol=1e-6, atol=1e-9)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)
    assert ours.step == balancer.step == 13


@pytest.fixture(scope="module")
def shards(train_shards):
    return train_shards()


@pytest.mark.parametrize("method", ["ogm-ge", "agm"])
def test_trainer_is_the_plugin_api(shards, tmp_path, monkeypatch, method):
    """``ogmge_train.train`` for two epochs == the same batches driven through the hooks of a plain
    loop (the README's pattern) on the same initial weights: bitwise equal parameters and buffers."""
    initial, batches = {}, []
    real_balancer, real_step = train_mod._balancer, Balancer.train_step

    def spy_balancer(cfg, model):
        if not initial:                              # the run's model (load_run builds another)
            initial.update({k: v.clone() for k, v in model.state_dict().items()})
        return real_balancer(cfg, model)

    def spy_step(self, inputs, labels, optimizer, **kw):
        batches.append((self.epoch, {u: x.clone() for u, x in inputs.items()}, labels.clone()))
        return real_step(self, inputs, labels, optimizer, **kw)

    monkeypatch.setattr(train_mod, "_balancer", spy_balancer)
    monkeypatch.setattr(Balancer, "train_step", spy_step)
    out = tmp_path / "run"
    cfg = resolve("demo", shards=str(shards), out=str(out), epochs=2, batch_size=8, image_size=32, workers=0,
                  device="cpu", modulation=method, optimizer="sgd", lr=0.05)
    train_mod.train(cfg)
    trained, cfg, _ = train_mod.load_run(out, "last")
    assert len(batches) > 2 and {e for e, _, _ in batches} == {0, 1}

    model = build_model(cfg.arch, cfg.fusion, trained.num_classes, cfg.modality, cfg.head_init)
    model.load_state_dict(initial)
    model.train()
    balancer = Balancer(method, model.modalities(cfg.modulation_scope), alpha=cfg.alpha, seed=cfg.seed,
                        start_epoch=cfg.modulation_start, end_epoch=cfg.modulation_end)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    assert cfg.lr_step > cfg.epochs                         # no lr change to replay
    for epoch, inputs, labels in batches:
        if epoch != balancer.epoch or balancer.step == 0:
            balancer.begin_epoch(epoch)
        balancer.begin_step(labels, inputs)
        out = av_output(model(inputs["audio"], inputs["visual"]))
        loss = F.cross_entropy(out.logits.float(), labels)
        opt.zero_grad()
        loss.backward()
        balancer.after_backward(out, labels)
        opt.step()
    for (n, a), b in zip(model.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b), n


# ---------------------------------------------------------------- hooks for issue-22's methods

class Alternate(Method):
    """Test-only (a): one forward/backward/update round per modality through the shared head, the
    other modalities' features multiplied by 0 (their encoders still get a zero gradient: DDP-safe)."""

    name = "test-alternate"

    def train_step(self, step, run):
        out = loss = None
        for u in step.modalities.names:
            def only(features, u=u):
                return {w: f if w == u else f * 0 for w, f in features.items()}
            out = run.forward(hook=only)
            loss = F.cross_entropy(out.logits, step.labels)
            if not run.backward(loss):
                return None
            run.update()
        assert out is not None and loss is not None
        return StepResult(out, loss, unit_stats(step.modalities), step.labels, run.updates)


class OwnHeads(Method):
    """Test-only (b): a classifier per modality owned by the method, trained with the model."""

    name = "test-heads"
    needs = ("num_classes", "dims")

    def setup(self, modalities):
        return linear_heads(modalities)

    def loss(self, out, step):
        loss = F.cross_entropy(out.logits, step.labels)
        for u in step.modalities.names:
            loss = loss + F.cross_entropy(step.modalities.aux[u](out.features[u]), step.labels)
        return loss


class Distill(Method):
    """Test-only (c): features pulled towards a frozen teacher (the model as it was at setup)."""

    name = "test-distill"
    needs = ("forward", "inputs")

    def setup(self, modalities):
        self.teacher = modalities.copy()
        self.teacher.model.eval().requires_grad_(False)
        return None

    def loss(self, out, step):
        with torch.no_grad():
            target = self.teacher.run(step.inputs)
        loss = F.cross_entropy(out.logits, step.labels)
        for u in step.modalities.names:
            loss = loss + F.mse_loss(out.features[u], target.features[u])
        return loss

    def state_dict(self):
        return {"teacher": self.teacher.model.state_dict()}

    def load_state_dict(self, state):
        if state:
            self.teacher.model.load_state_dict(state["teacher"])


class Ensemble(Method):
    """Test-only (d): at evaluation the fused logits are the mean of the modalities' own logits."""

    name = "test-ensemble"

    def fuse(self, out, modalities):
        return torch.stack([out.unimodal[u] for u in modalities.names]).mean(0)


def _readme_model():
    ns = readme_example()
    torch.manual_seed(3)
    model = ns["TinyAV"]()
    side = Modalities(model, {"audio": model.audio, "video": model.video},
                      forward=lambda m, inputs, hook: m(inputs, hook), num_classes=6, dims={"audio": 16, "video": 16})
    return ns, model, side


def test_several_optimizer_rounds_per_batch():
    """(a) train_step may run forward/backward/update once per modality: equal to doing it by hand."""
    ns, model, side = _readme_model()
    twin = copy.deepcopy(model)
    balancer = Balancer(Alternate(), side)
    opt, twin_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin))
    inputs, labels = ns["batch"](8)
    result = balancer.train_step(inputs, labels, opt)
    assert result is not None and result.updates == 2 and balancer.step == 1
    for u in ("audio", "video"):
        def only(features, u=u):
            return {w: f if w == u else f * 0 for w, f in features.items()}
        twin_opt.zero_grad()
        F.cross_entropy(twin(inputs, only).logits, labels).backward()
        twin_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    with pytest.raises(ConfigError, match="several forward/backward/optimizer rounds"):
        balancer.after_backward(result.out, labels)     # not drivable from a loop's hooks


def test_heads_a_method_owns_are_model_parameters():
    """(b) setup's modules become model.aux_heads: in the optimizer's parameters, trained, saved in
    the model's state_dict, copied with the model."""
    ns, model, side = _readme_model()
    balancer = Balancer(OwnHeads(), side)
    assert isinstance(model.aux_heads, nn.ModuleDict) and set(model.aux_heads) == {"audio", "video"}
    assert "aux_heads.audio.weight" in model.state_dict()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)                 # built after the balancer
    before = model.aux_heads["video"].weight.clone()
    inputs, labels = ns["batch"](8)
    balancer.train_step(inputs, labels, opt)
    assert not torch.equal(model.aux_heads["video"].weight, before)
    twin = side.copy()
    assert twin.aux is not model.aux_heads and torch.equal(twin.aux["video"].weight, model.aux_heads["video"].weight)
    with pytest.raises(ConfigError, match="num_classes=..., dims="):
        Balancer(OwnHeads(), Modalities(model, {"audio": model.audio, "video": model.video}))


def test_a_skipped_loss_hook_is_a_clear_error():
    ns, model, side = _readme_model()
    balancer = Balancer(OwnHeads(), side)
    inputs, labels = ns["batch"](8)
    out = model(inputs)
    F.cross_entropy(out.logits, labels).backward()
    with pytest.raises(ConfigError, match=r"test-heads: back-propagate loss = balancer.loss"):
        balancer.after_backward(out, labels)
    assert balancer.required == ("loss", "after_backward")


def test_frozen_teacher_stays_frozen_and_resumes():
    """(c) a teacher made in setup: not a model parameter (so not in the optimizer or DDP), unchanged by
    training, in eval mode, saved and restored through the method's state_dict."""
    ns, model, side = _readme_model()
    method = Distill()
    balancer = Balancer(method, side)
    teacher_params = list(method.teacher.model.parameters())
    assert not any(p is q for p in teacher_params for q in model.parameters())
    start = [p.clone() for p in teacher_params]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, labels = ns["batch"](8)
    for _ in range(2):
        balancer.train_step(inputs, labels, opt)
    assert all(torch.equal(p, q) for p, q in zip(teacher_params, start))
    assert not method.teacher.model.training and not any(p.requires_grad for p in teacher_params)
    # after two steps the student left the teacher: the distillation term has a gradient
    out = model(inputs)
    with pytest.raises(ConfigError, match=r"test-distill: call balancer.begin_step\(labels, inputs\)"):
        balancer.loss(out, labels)
    balancer.begin_step(labels, inputs)
    loss = balancer.loss(out, labels)
    assert loss.item() > F.cross_entropy(out.logits, labels).item()
    other = Distill()
    twin_model = ns["TinyAV"]()
    other_balancer = Balancer(other, Modalities(twin_model, {"audio": twin_model.audio, "video": twin_model.video},
                                                forward=lambda m, i, h: m(i, h)))
    other_balancer.load_state_dict(balancer.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(other.teacher.model.parameters(), teacher_params))


def test_evaluation_fusion_rule_is_used_by_predict():
    """(d) Balancer.predict applies the method's fusion rule; the default is the fused logits."""
    ns, model, side = _readme_model()
    out = model(ns["batch"](8)[0])
    assert torch.equal(Balancer(Ensemble(), side).predict(out), (out.unimodal["audio"] + out.unimodal["video"]) / 2)
    assert Balancer("none", side).predict(out) is out.logits


def test_trainer_evaluates_with_the_methods_fusion_rule(shards, tmp_path, monkeypatch):
    """(d) ogmge_train.train and evaluate select and report with the method's test-time fusion rule."""
    def ensemble(cfg, model):
        return Balancer(Ensemble(), model.modalities(cfg.modulation_scope), seed=cfg.seed)
    monkeypatch.setattr(train_mod, "_balancer", ensemble)
    out = tmp_path / "run"
    cfg = resolve("demo", shards=str(shards), out=str(out), epochs=1, batch_size=8, image_size=32, workers=0,
                  device="cpu", modulation="none")
    train_mod.train(cfg)
    record = train_mod.runfolder.read_metrics(out)[-1]
    model, cfg, _ = train_mod.load_run(out, "last")
    loader = train_mod._loader(cfg, "val", train=False, epoch=0, info=train_mod.dist.DistInfo())
    fused, ensembled, labels = [], [], []
    with torch.no_grad():
        for batch in loader:
            a, v, y = train_mod._to(batch, torch.device("cpu"))
            o = model(a, v)
            fused.append(o.logits)
            ensembled.append((o.logits_a + o.logits_v) / 2)
            labels.append(y)
    y = torch.cat(labels)
    assert record["val"]["loss"] == pytest.approx(F.cross_entropy(torch.cat(ensembled), y).item(), rel=1e-5)
    assert record["val"]["loss"] != pytest.approx(F.cross_entropy(torch.cat(fused), y).item(), rel=1e-3)
    assert train_mod.evaluate(out, "val", "last", device="cpu", workers=0)["loss"] == pytest.approx(
        record["val"]["loss"], rel=1e-6)


# ---------------------------------------------------------------- your loop: the rules

def test_hooks_a_method_needs_are_enforced():
    model = build_model("small", "concat", 5)
    labels = torch.randint(0, 5, (4,))
    out = av_output(model(torch.randn(4, 1, 32, 48), torch.randn(4, 1, 3, 32, 32)))
    cases = {"agm": r"agm: call balancer.begin_step\(labels, inputs\) before the forward pass",
             "pmr": r"pmr: call balancer.begin_epoch",
             "gradient-blending": r"gradient-blending: call balancer.begin_epoch",
             "modality-drop": r"modality-drop: pass balancer.feature_hook\(\) to your forward",
             "mmpareto": r"mmpareto: back-propagate loss = balancer.loss"}
    for name, message in cases.items():
        fresh = copy.deepcopy(model)                     # methods with heads add them to the model
        with pytest.raises(ConfigError, match=message):
            Balancer(name, fresh.modalities()).after_backward(out, labels)
    assert Balancer("pmr", model.modalities()).required == ("begin_epoch", "loss", "after_backward")
    assert Balancer("agm", model.modalities()).required == ("begin_step", "after_backward")
    assert Balancer("gradient-blending", copy.deepcopy(model).modalities()).required == (
        "begin_epoch", "train_rows", "loss", "after_backward")
    with pytest.raises(ConfigError, match="ogm-ge scales gradients .* give alpha="):
        Balancer("ogm-ge", model.modalities())
    with pytest.raises(ConfigError, match=r"pmr needs Modalities\(\.\.\., forward=\.\.\., num_classes=\.\.\.\)"):
        Balancer("pmr", Modalities(model, {"audio": model.audio_encoder, "visual": model.visual_encoder}))


def _plain_pair(seed=0):
    """Two copies of a BatchNorm-free two-modality model (the README's) and its side descriptions."""
    ns = readme_example()
    torch.manual_seed(seed)
    a = ns["TinyAV"]()
    b = copy.deepcopy(a)
    sides = [Modalities(m, {"audio": m.audio, "video": m.video}, forward=lambda m, i, h: m(i, h)) for m in (a, b)]
    return ns, a, b, sides


def test_gradient_accumulation_equals_one_big_batch():
    """OGM-GE with two micro-batches of 8 (after_backward once, on the joined outputs) leaves the
    gradients of one batch of 16 (no BatchNorm: the losses do not couple the samples)."""
    ns, big, small, (side_big, side_small) = _plain_pair()
    inputs, labels = ns["batch"](16)
    one = Balancer("ogm-ge", side_big, alpha=0.8)
    out = big(inputs)
    F.cross_entropy(out.logits, labels).backward()
    stats_one = one.after_backward(out, labels)

    acc = Balancer("ogm-ge", side_small, alpha=0.8, accumulation=2)
    outs = []
    for part in (slice(0, 8), slice(8, 16)):
        o = small({u: x[part] for u, x in inputs.items()})
        (F.cross_entropy(o.logits, labels[part]) / 2).backward()
        outs.append(o)
    stats_acc = acc.after_backward(Output.cat(outs), torch.cat([labels[:8], labels[8:]]))
    assert stats_acc == pytest.approx(stats_one, rel=1e-6)
    for g, h in zip(_grads(big), _grads(small)):                   # float32 sums in another order
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-5 * g.abs().max().item())
    for name in ("pmr", "mmpareto", "agm", "opm"):
        with pytest.raises(ConfigError, match="does not work with gradient accumulation"):
            Balancer(name, build_model("small", "concat", 5).modalities(), accumulation=2)
    with pytest.raises(ConfigError, match="does not work with gradient accumulation"):
        Balancer("ogm-ge", side_small, alpha=0.8, accumulation=2, ge_noise="paper")
    with pytest.raises(ConfigError, match="train_step runs one optimizer step per batch"):
        acc.train_step(inputs, labels, torch.optim.SGD(small.parameters(), lr=0.1))


def test_bf16_autocast_through_hooks_and_train_step():
    """Under bf16 autocast a loop's hooks and train_step give the same step (and finite, modulated)."""
    ns, a, b, (side_a, side_b) = _plain_pair()
    inputs, labels = ns["batch"](16)
    hooks, steps = Balancer("ogm-ge", side_a, alpha=0.8), Balancer("ogm-ge", side_b, alpha=0.8)
    opt_a, opt_b = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (a, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = a(inputs)
    assert out.logits.dtype == torch.bfloat16
    loss = F.cross_entropy(out.logits.float(), labels)
    opt_a.zero_grad()
    loss.backward()
    stats = hooks.after_backward(out, labels)
    opt_a.step()
    result = steps.train_step(inputs, labels, opt_b, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert result.stats == stats and min(stats["k_a"], stats["k_v"]) < 1
    assert all(torch.equal(p, q) and torch.isfinite(p).all() for p, q in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------- DDP

def _ddp_worker(rank, world, port, path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ns = readme_example()
    results = {}
    for phase, kind in (("ogm-ge", {"alpha": 0.8}), ("paper", {"alpha": 0.8, "ge_noise": "paper"}),
                        ("alternate", None)):
        torch.manual_seed(0)                     # the same initial weights on both ranks
        model = ns["TinyAV"]()
        side = Modalities(model, {"audio": model.audio, "video": model.video}, forward=lambda m, i, h: m(i, h))
        balancer = Balancer(Alternate(), side) if kind is None else Balancer("ogm-ge", side, **kind)
        net = DDP(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        data = torch.Generator().manual_seed(7)  # the same global batches; each rank takes its half
        stats = []
        for _ in range(3):
            labels = torch.randint(0, 6, (8,), generator=data)
            inputs = {"audio": torch.randn(8, 1, 800, generator=data) + labels.view(-1, 1, 1),
                      "video": torch.randn(8, 3, 32, 32, generator=data)}
            mine = slice(4 * rank, 4 * rank + 4)
            inputs, labels = {u: x[mine] for u, x in inputs.items()}, labels[mine]
            if kind is None:
                stats.append(balancer.train_step(inputs, labels, opt, model=net).stats)
                continue
            out = net(inputs)
            loss = balancer.loss(out, labels)
            opt.zero_grad()
            loss.backward()
            stats.append(balancer.after_backward(out, labels))
            opt.step()
        results[phase] = {"params": [p.detach().clone() for p in model.parameters()], "stats": stats}
    torch.save(results, f"{path}.{rank}")
    dist.destroy_process_group()


def test_ddp_two_ranks_stay_identical_and_equal_one_process(tmp_path):
    """Two gloo ranks, half a batch each: OGM-GE (code and paper noise) and a multi-round method keep
    bitwise identical parameters; with code noise they equal one process on the whole batch."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "r")), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"r.{i}", weights_only=True) for i in range(2))
    for phase in ("ogm-ge", "paper", "alternate"):
        assert r0[phase]["stats"] == r1[phase]["stats"], phase
        assert all(torch.equal(p, q) for p, q in zip(r0[phase]["params"], r1[phase]["params"])), phase

    ns = readme_example()
    torch.manual_seed(0)
    model = ns["TinyAV"]()
    balancer = Balancer("ogm-ge", Modalities(model, {"audio": model.audio, "video": model.video}), alpha=0.8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = torch.Generator().manual_seed(7)
    for i in range(3):
        labels = torch.randint(0, 6, (8,), generator=data)
        inputs = {"audio": torch.randn(8, 1, 800, generator=data) + labels.view(-1, 1, 1),
                  "video": torch.randn(8, 3, 32, 32, generator=data)}
        out = model(inputs)
        opt.zero_grad()
        F.cross_entropy(out.logits, labels).backward()
        stats = balancer.after_backward(out, labels)
        opt.step()
        assert stats == pytest.approx(r0["ogm-ge"]["stats"][i], rel=1e-6)
    for p, q in zip(model.parameters(), r0["ogm-ge"]["params"]):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- three modalities

NAMES3 = ("audio", "visual", "text")


class Tri(nn.Module):
    """A three-modality model: a small encoder per modality, a concatenation head (unimodal logits
    ``W_u u + b/3``)."""

    def __init__(self, classes=4, width=6, cue=(2.0, 1.0, 0.3)):
        super().__init__()
        self.width, self.cue = width, cue
        self.enc = nn.ModuleDict({u: nn.Sequential(nn.Linear(5, width), nn.Tanh()) for u in NAMES3})
        self.head = nn.Linear(3 * width, classes)

    def unimodal(self, features):
        w, b = self.head.weight, self.head.bias
        return {u: features[u] @ w[:, i * self.width:(i + 1) * self.width].T + b / 3 for i, u in enumerate(NAMES3)}

    def forward(self, inputs, hook=None):
        features = {u: self.enc[u](inputs[u]) for u in NAMES3}
        if hook is not None:
            features = hook(features)
        return Output(self.head(torch.cat([features[u] for u in NAMES3], 1)), self.unimodal(features), features)


def _tri(seed=0):
    torch.manual_seed(seed)
    model = Tri()
    side = Modalities(model, {u: model.enc[u] for u in NAMES3}, forward=lambda m, i, h: m(i, h),
                      unimodal=lambda m, f: m.unimodal(f), head=model.head, num_classes=4,
                      dims=dict.fromkeys(NAMES3, 6))
    return model, side


def _tri_batch(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    onehot = F.one_hot(labels, 5).float()       # class cues of different strength per modality
    inputs = {u: torch.randn(n, 5, generator=g) + c * onehot for u, c in zip(NAMES3, Tri().cue)}
    return inputs, labels


def test_three_modalities_ogm_matches_the_generalised_reference():
    """rho_u = s_u / mean_{w != u} s_w from a per-sample loop; k_u = 1 - tanh(alpha rho_u) when
    rho_u > 1; each encoder's gradient scaled by its k."""
    model, side = _tri()
    inputs, labels = _tri_batch()
    out = model(inputs)
    F.cross_entropy(out.logits, labels).backward()
    before = {u: [p.grad.clone() for p in side.params(u)] for u in NAMES3}
    stats = Balancer("ogm", side, alpha=0.5).after_backward(out, labels)
    s = {u: sum(torch.softmax(out.unimodal[u][i].double(), 0)[labels[i]].item() for i in range(len(labels)))
         for u in NAMES3}
    for u, t in zip(NAMES3, "avt"):
        rho = s[u] / (sum(s[w] for w in NAMES3 if w != u) / 2)
        k = 1 - math.tanh(0.5 * rho) if rho > 1 else 1.0
        assert stats[f"rho_{t}"] == pytest.approx(rho, rel=1e-6) and stats[f"k_{t}"] == pytest.approx(k, rel=1e-6)
        for p, g in zip(side.params(u), before[u]):
            torch.testing.assert_close(p.grad, g * stats[f"k_{t}"])
    assert stats["k_t"] == 1.0 and min(stats["k_a"], stats["k_v"]) < 1   # the weakest is never slowed


@pytest.mark.parametrize("name", ["none", "ogm", "ge", "ogm-ge", "modality-drop", "opm", "opm-ge", "pmr", "mmpareto",
                                  "gradient-blending"])
def test_three_modalities_train_with_every_method_defined_for_them(name):
    model, side = _tri()
    balancer = Balancer(name, side, alpha=0.5, drop_p=0.5, opm_p_exe=1.0, gb_super_epoch=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [_tri_batch(16, seed=s) for s in range(3)]
    keyed = [(i, y, [f"k{s}-{j}" for j in range(len(y))]) for s, (i, y) in enumerate(data)]
    start = copy.deepcopy([p.detach() for p in model.parameters()])
    for epoch in range(2):
        balancer.begin_epoch(epoch, steps=len(data), batches=lambda n: iter(data[:n]),
                             keyed_batches=lambda e: iter(keyed),
                             make_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), epochs=2)
        for inputs, labels, keys in keyed:
            result = balancer.train_step(inputs, labels, opt, keys=keys)
            assert result is not None and math.isfinite(result.loss.item())
    stats = result.stats
    assert {"rho_a", "rho_v", "rho_t", "k_a", "k_v", "k_t"} <= set(stats)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), start))
    if name.startswith("opm"):
        assert min(stats[f"q_{t}"] for t in "avt") == 0.0          # the weakest modality is never dropped
    if name == "pmr":                                                # alpha on every modality below the others
        assert all(stats[f"k_{t}"] == (1.0 if stats[f"rho_{t}"] < 1 else 0.0) for t in "avt")
    if name == "mmpareto":
        assert all(-1 <= stats[f"cos_{t}"] <= 1 for t in "avt")
    if name == "gradient-blending":
        assert sum(stats[k] for k in ("gb_f", "gb_a", "gb_v", "gb_t")) == pytest.approx(1.0)


def test_three_modalities_drop_either_modality_uniformly():
    method = modulation.build("modality-drop", drop_p=0.6)
    torch.manual_seed(0)
    features = {u: torch.rand(6000, 4) + 0.1 for u in NAMES3}
    dropped = method.transform_features(features, training=True)
    gone = torch.stack([(dropped[u] == 0).all(1) for u in NAMES3])
    assert (gone.sum(0) <= 1).all()
    for row in gone:
        assert row.float().mean().item() == pytest.approx(0.2, abs=0.02)


def test_agm_refuses_three_modalities():
    model, side = _tri()
    with pytest.raises(ConfigError, match="agm is defined for 2 modalities, not 3"):
        Balancer("agm", side)


def test_agm_on_a_model_of_ones_own():
    """agm runs the model itself (zeroed inputs): with forward= and head= it trains the README's model
    through train_step and through a loop's hooks alike."""
    ns = readme_example()
    torch.manual_seed(4)
    a = ns["TinyAV"]()
    b = copy.deepcopy(a)
    sides = [Modalities(m, {"audio": m.audio, "video": m.video}, forward=lambda m, i, h: m(i, h), head=m.head)
             for m in (a, b)]
    hooks, steps = Balancer("agm", sides[0], agm_alpha=0.4), Balancer("agm", sides[1], agm_alpha=0.4)
    opt_a, opt_b = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (a, b))
    for _ in range(2):
        inputs, labels = ns["batch"](8)
        hooks.begin_step(labels, inputs)
        out = a(inputs)
        loss = hooks.loss(out, labels)
        opt_a.zero_grad()
        loss.backward()
        stats = hooks.after_backward(out, labels)
        opt_a.step()
        assert steps.train_step(inputs, labels, opt_b).stats == stats
    assert stats["k_a"] != 1.0 and stats["agm_t_a"] > 0
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ConfigError, match=r"agm needs Modalities\(\.\.\., head=\.\.\.\)"):
        Balancer("agm", Modalities(a, {"audio": a.audio, "video": a.video}, forward=lambda m, i, h: m(i, h)))
