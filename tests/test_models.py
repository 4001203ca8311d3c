"""Encoders, fusion heads and the unimodal estimates of ogmge_train.models."""
import math

import pytest
import torch
from torch import nn

from ogmge_train.errors import ConfigError
from ogmge_train.models import FUSIONS, HEADS, ModelOutput, build_model

B, C = 3, 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(frames=2, size=32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 1, 40, 48, generator=g), torch.randn(B, frames, 3, size, size, generator=g)


def _resnet18_params(in_channels: int) -> int:
    """Parameter count of a torchvision-style ResNet-18 trunk (no fc), from the architecture table."""
    def conv(cin, cout, k):
        return cin * cout * k * k

    def bn(c):
        return 2 * c

    total = conv(in_channels, 64, 7) + bn(64)
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            first = block == 0
            c_in = cin if first else cout
            total += conv(c_in, cout, 3) + bn(cout) + conv(cout, cout, 3) + bn(cout)
            if first and (stride != 1 or c_in != cout):
                total += conv(c_in, cout, 1) + bn(cout)
        cin = cout
    return total


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def resnet18():
    return build_model("resnet18", "concat", C)


def test_resnet18_parameter_counts(resnet18):
    model = resnet18
    # torchvision's resnet18 has 11,689,512 parameters, of which fc is 512*1000 + 1000
    assert _resnet18_params(3) == 11_689_512 - 513_000
    assert _count(model.visual_encoder) == _resnet18_params(3)
    # the 1-channel stem saves 2 * 64 * 7 * 7 weights
    assert _count(model.audio_encoder) == _resnet18_params(1) == _resnet18_params(3) - 2 * 64 * 49
    assert _count(model.head) == (512 + 512) * C + C
    convs = [m for m in model.audio_encoder.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 16 + 3  # stem, 8 blocks x 2, 3 downsample 1x1 convs


def _check_shapes(model, dim):
    out = model(*_batch())
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == out.logits_a.shape == out.logits_v.shape == (B, C)
    assert out.feat_a.shape == out.feat_v.shape == (B, dim)
    assert all(torch.isfinite(t).all() for t in out if t is not None)


def test_resnet18_output_shapes(resnet18):
    _check_shapes(resnet18, 512)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_output_shapes(fusion):
    _check_shapes(build_model("small", fusion, C), 128)
    # every head on 512-d features (the ResNet-18 width), without building the encoders
    head = HEADS[fusion](512, 512, C)
    logits = head(torch.randn(B, 512), torch.rand(B, 512))
    assert [t.shape for t in logits] == [(B, C)] * 3


def test_visual_features_are_the_mean_over_frames():
    model = build_model("small", "concat", C).eval()
    audio, visual = _batch(frames=3)
    out = model(audio, visual)
    per_frame = torch.stack([model.visual_encoder(visual[:, i : i + 1]) for i in range(3)])
    torch.testing.assert_close(out.feat_v, per_frame.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("modality", ["audio", "visual"])
def test_unimodal_models(modality):
    model = build_model("small", "film", C, modality=modality)
    audio, visual = _batch()
    out = model(audio, None) if modality == "audio" else model(None, visual)
    assert out.logits.shape == (B, C)
    own, other = (out.logits_a, out.logits_v) if modality == "audio" else (out.logits_v, out.logits_a)
    assert own is out.logits and other is None
    assert (model.audio_encoder is None) == (modality == "visual")
    assert isinstance(model.head, nn.Linear) and model.head.out_features == C
    other_name = "visual" if modality == "audio" else "audio"
    assert model.modulated_parameters(other_name) == []


def test_concat_unimodal_logits_sum_to_fused():
    model = build_model("small", "concat", C)
    nn.init.normal_(model.head.fc.bias)  # a non-zero bias, so b/2 is really exercised
    out = model(*_batch())
    w, b = model.head.fc.weight, model.head.fc.bias
    torch.testing.assert_close(out.logits_a, out.feat_a @ w[:, :128].T + b / 2)
    torch.testing.assert_close(out.logits_v, out.feat_v @ w[:, 128:].T + b / 2)
    torch.testing.assert_close(out.logits_a + out.logits_v, out.logits, rtol=1e-5, atol=1e-5)


def test_sum_unimodal_logits_are_the_branches():
    model = build_model("small", "sum", C)
    out = model(*_batch())
    torch.testing.assert_close(out.logits_a, model.head.fc_a(out.feat_a))
    torch.testing.assert_close(out.logits_v, model.head.fc_v(out.feat_v))
    torch.testing.assert_close(out.logits, out.logits_a + out.logits_v)


@pytest.mark.parametrize("fusion", ["film", "gated"])
def test_nonadditive_heads_substitute_the_running_mean(fusion):
    model = build_model("small", fusion, C)
    head = model.head
    batches = [_batch() for _ in range(3)]
    feats = []
    for audio, visual in batches:
        out = model(audio, visual)
        feats.append((out.feat_a.detach(), out.feat_v.detach()))
    # three batches: still in the running-average phase, so the means are plain averages
    torch.testing.assert_close(head.mean_a, torch.stack([a.mean(0) for a, _ in feats]).mean(0))
    torch.testing.assert_close(head.mean_v, torch.stack([v.mean(0) for _, v in feats]).mean(0))
    model.eval()
    out = model(*batches[0])
    torch.testing.assert_close(head.mean_a, torch.stack([a.mean(0) for a, _ in feats]).mean(0))  # frozen
    a, v = out.feat_a, out.feat_v
    if fusion == "film":
        def f(a, v):
            gamma, beta = (a @ head.film.weight.T + head.film.bias).chunk(2, dim=1)
            return (gamma * v + beta) @ head.fc_out.weight.T + head.fc_out.bias
    else:
        def f(a, v):
            gate = torch.sigmoid(a @ head.fc_a.weight.T + head.fc_a.bias)
            return (gate * (v @ head.fc_v.weight.T + head.fc_v.bias)) @ head.fc_out.weight.T + head.fc_out.bias
    torch.testing.assert_close(out.logits, f(a, v), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits_a, f(a, head.mean_v.expand_as(v)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits_v, f(head.mean_a.expand_as(a), v), rtol=1e-5, atol=1e-5)


def test_running_mean_becomes_an_ema():
    model = build_model("small", "gated", C)
    head = model.head
    for _ in range(10):
        model(*_batch())
    before = head.mean_a.clone()
    out = model(*_batch())
    torch.testing.assert_close(head.mean_a, 0.9 * before + 0.1 * out.feat_a.detach().mean(0))
    assert int(head.num_batches_tracked) == 11
    assert "head.mean_a" in model.state_dict()


def test_feature_hook_replaces_features_before_fusion():
    model = build_model("small", "concat", C)
    audio, visual = _batch()
    out = model(audio, visual, feature_hook=lambda a, v: (torch.zeros_like(a), v))
    assert torch.count_nonzero(out.feat_a) == 0
    torch.testing.assert_close(out.logits_a, (model.head.fc.bias / 2).expand(B, C))


def test_modulated_parameters(resnet18):
    model = resnet18
    conv = model.modulated_parameters("audio")
    assert len(conv) == 20 and all(p.dim() == 4 for _, p in conv)
    assert all(name.startswith("audio_encoder.") for name, _ in conv)
    named = dict(model.named_parameters())
    assert all(named[name] is p for name, p in conv)
    everything = model.modulated_parameters("visual", scope="all")
    assert [n for n, _ in everything] == [n for n in named if n.startswith("visual_encoder.")]
    with pytest.raises(ValueError):
        model.modulated_parameters("audio", scope="bn")


def test_build_model_rejects_bad_choices():
    with pytest.raises(ConfigError, match="fusion"):
        build_model("small", "attention", C)
    with pytest.raises(ConfigError, match="arch"):
        build_model("resnet50", "concat", C)
    with pytest.raises(ConfigError, match="modality"):
        build_model("small", "concat", C, modality="text")


@pytest.mark.parametrize("fusion", FUSIONS)
def test_head_init_xavier_is_the_default_and_torch_is_pytorchs(fusion):
    """The reference code's weight_init: xavier-normal weights, zero bias for every head Linear."""
    torch.manual_seed(0)
    model = build_model("resnet18" if fusion == "concat" else "small", fusion, 31)
    linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    assert linears
    for m in linears:
        fan_out, fan_in = m.weight.shape
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
        assert m.weight.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.1)
    torch.manual_seed(0)
    plain = build_model("small", fusion, 31, head_init="torch")
    for m in (m for m in plain.head.modules() if isinstance(m, nn.Linear)):
        bound = 1 / math.sqrt(m.weight.shape[1])
        assert m.bias.abs().max().item() <= bound and m.bias.abs().max().item() > 0
        assert m.weight.abs().max().item() <= bound
    with pytest.raises(ConfigError, match="head_init"):
        build_model("small", fusion, 31, head_init="zeros")


def test_registries_are_the_names_module():
    from ogmge_train import names
    from ogmge_train.models import ARCHS, HEAD_INITS, MODALITIES
    assert tuple(HEADS) == FUSIONS == names.FUSIONS
    assert (ARCHS, HEAD_INITS, MODALITIES) == (names.ARCHS, names.HEAD_INITS, names.MODALITIES)
