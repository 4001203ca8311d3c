"""Audio and visual encoders, fusion heads and the two-stream model (README: Training).

Encoders return pooled feature vectors: ResNet-18 (512-d) or a small CNN for CPU demos (128-d).
The audio encoder reads (B, 1, F, T) spectrograms; the visual encoder runs on each of the n frames
of (B, n, 3, H, W) and mean-pools over time and space.

Every head returns fused logits and an estimate of each modality's own logits (what OGM-GE's
discrepancy ratio and the unimodal metrics use):

- concat ``W[a; v] + b``: ``W_a a + b/2`` and ``W_v v + b/2`` (the reference code; they sum to the
  fused logits).
- sum ``(W_a a + b_a) + (W_v v + b_v)``: each branch on its own.
- film and gated (not additive, so no exact split exists): the head evaluated on the modality's
  own features with the *other* modality replaced by its running mean feature (an exponential
  moving average over training batches, kept in buffers like BatchNorm's running stats). This is
  the prediction when the other input carries no sample-specific information. Unlike zeroing, it
  keeps the other input in distribution: pooled ReLU features are positive with a large mean, so a
  zero vector is far from anything the head was trained on. It is deterministic at evaluation
  (does not depend on batch composition); the cost is two extra head evaluations per batch.

``AVModel.modalities(scope)`` is the model side of the plug-in API (``ogmge_train.modalities``):
modalities "audio" and "visual", their encoders, the modulated parameters of ``scope``, the forward
and the head's unimodal logits.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from .errors import ConfigError
from .modalities import Modalities, Output
from .names import ARCHS, AUDIO_ARCHS, FUSIONS, HEAD_INITS, MODALITIES, SCOPES

if TYPE_CHECKING:
    from .xvector import XVector

__all__ = ["ARCHS", "FUSIONS", "HEAD_INITS", "MODALITIES", "AVModel", "ModelOutput", "av_output", "build_model"]

# the layers whose weights the "conv" scope modulates: the reference code's conv weights (4-D tensors),
# and, in encoders that have them (the x-vector TDNN), time-delay and segment-level layers
WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)

FeatureHook = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class ModelOutput(NamedTuple):
    """Fused logits (B, C), unimodal logits (None for a missing modality) and pooled features."""

    logits: torch.Tensor
    logits_a: torch.Tensor | None
    logits_v: torch.Tensor | None
    feat_a: torch.Tensor | None
    feat_v: torch.Tensor | None


def av_output(out: ModelOutput) -> Output:
    """The plug-in API's view of a forward pass (modalities "audio" and "visual", those present)."""
    pairs = (("audio", out.logits_a, out.feat_a), ("visual", out.logits_v, out.feat_v))
    return Output(out.logits, {u: lg for u, lg, _ in pairs if lg is not None},
                  {u: f for u, _, f in pairs if f is not None})


def _forward(model, inputs: dict, hook) -> Output:
    """``Modalities.forward`` of an AVModel (or its DDP wrapper, or a copy)."""
    audio, visual = inputs.get("audio"), inputs.get("visual")
    if hook is None:
        return av_output(model(audio, visual))

    def feature_hook(a, v):
        f = hook({"audio": a, "visual": v})
        return f["audio"], f["visual"]
    if hasattr(hook, "stage"):
        feature_hook.stage = hook.stage       # type: ignore[attr-defined]
    return av_output(model(audio, visual, feature_hook=feature_hook))


def _unimodal(model, features: dict) -> dict:
    logits_a, logits_v = model.unimodal_logits(features["audio"], features["visual"])
    return {"audio": logits_a, "visual": logits_v}


# ---------------------------------------------------------------- encoders

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18Trunk(nn.Module):
    """ResNet-18 without the classifier: (N, C, H, W) -> (N, 512, h, w) feature maps."""

    out_dim = 512

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for i, cout in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    widths = (64, 128, 256, 512)

    def stage(self, i: int, x):
        """Stage i of 4 (0: stem and layer1, then layer2..layer4): where a mid-fusion hook is called."""
        if i == 0:
            return self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        return (self.layer2, self.layer3, self.layer4)[i - 1](x)

    def forward(self, x):
        for i in range(4):
            x = self.stage(i, x)
        return x


class SmallTrunk(nn.Module):
    """Four stride-2 conv-BN-ReLU blocks (32-64-128-128 channels): fast on CPU, 128-d features."""

    out_dim = 128

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (32, 64, 128, 128)):
        super().__init__()
        blocks, cin = [], in_channels
        for w in widths:
            blocks += [nn.Conv2d(cin, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            cin = w
        self.body = nn.Sequential(*blocks)
        self.widths = tuple(widths)

    def stage(self, i: int, x):
        """Block i (conv-BN-ReLU): where a mid-fusion hook is called."""
        return self.body[3 * i:3 * i + 3](x)

    def forward(self, x):
        return self.body(x)


def _trunk(arch: str, in_channels: int) -> ResNet18Trunk | SmallTrunk:
    return ResNet18Trunk(in_channels) if arch == "resnet18" else SmallTrunk(in_channels)


class AudioEncoder(nn.Module):
    """(B, 1, F, T) spectrogram -> (B, D), global average pooling."""

    def __init__(self, arch: str):
        super().__init__()
        self.trunk = _trunk(arch, 1)
        self.out_dim = self.trunk.out_dim

    def forward(self, audio):
        return self.pool(self.trunk(audio))

    def pool(self, maps):
        return maps.mean(dim=(2, 3))


def make_audio_encoder(arch: str, audio_arch: str = "same", bins: int | None = None) -> AudioEncoder | XVector:
    """The audio encoder: ``AudioEncoder(arch)``, or with ``audio_arch="xvector"`` the x-vector
    TDNN (``ogmge_train.xvector``) over ``bins`` frequency bins (dataset.json's spectrogram shape)."""
    if audio_arch == "same":
        return AudioEncoder(arch)
    if audio_arch != "xvector":
        raise ConfigError(f"audio_arch must be one of {', '.join(AUDIO_ARCHS)}, not {audio_arch!r}")
    if not bins:
        raise ConfigError("--audio-arch xvector needs the spectrogram's frequency bins (audio_bins)")
    from .xvector import XVector

    return XVector(bins, small=arch == "small")


class VisualEncoder(nn.Module):
    """(B, n, 3, H, W) frames -> (B, D): the trunk on every frame, mean over frames and space."""

    def __init__(self, arch: str):
        super().__init__()
        self.trunk = _trunk(arch, 3)
        self.out_dim = self.trunk.out_dim

    def forward(self, visual):
        return self.pool(self.trunk(visual.flatten(0, 1)), visual.shape[0])      # maps: (B*n, D, h, w)

    def pool(self, maps, batch: int):
        return maps.unflatten(0, (batch, -1)).mean(dim=(1, 3, 4))


# ---------------------------------------------------------------- fusion heads

class ConcatHead(nn.Module):
    """``W[a; v] + b``; unimodal ``W_u u + b/2``."""

    def __init__(self, da: int, dv: int, num_classes: int):
        super().__init__()
        self.da = da
        self.fc = nn.Linear(da + dv, num_classes)

    def unimodal(self, a, v):
        w_a, w_v = self.fc.weight[:, : self.da], self.fc.weight[:, self.da :]
        half_b = self.fc.bias / 2
        return a @ w_a.t() + half_b, v @ w_v.t() + half_b

    def forward(self, a, v):
        return (self.fc(torch.cat([a, v], dim=1)), *self.unimodal(a, v))


class SumHead(nn.Module):
    """``(W_a a + b_a) + (W_v v + b_v)``; unimodal: each branch."""

    def __init__(self, da: int, dv: int, num_classes: int):
        super().__init__()
        self.fc_a = nn.Linear(da, num_classes)
        self.fc_v = nn.Linear(dv, num_classes)

    def unimodal(self, a, v):
        return self.fc_a(a), self.fc_v(v)

    def forward(self, a, v):
        la, lv = self.unimodal(a, v)
        return la + lv, la, lv


class _MeanSubstitutionHead(nn.Module):
    """A non-additive head ``f(a, v)`` whose unimodal logits are ``f(a, mean_v)`` and ``f(mean_a, v)``.

    The means are running averages of the features the head sees in training mode: the plain
    average of the first 10 batches, then an EMA with momentum 0.1. They are updated before use,
    so the very first batch already substitutes a real mean rather than zeros (a head that never
    saw a training batch substitutes zeros).
    """

    momentum = 0.1

    def __init__(self, da: int, dv: int):
        super().__init__()
        self.register_buffer("mean_a", torch.zeros(da))
        self.register_buffer("mean_v", torch.zeros(dv))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def fuse(self, a, v):
        raise NotImplementedError

    @torch.no_grad()
    def _update_means(self, a, v):
        n = self.num_batches_tracked
        # 1/(n+1) while larger than the momentum: an exact running average early on; no host sync
        m = torch.clamp(1.0 / (n + 1).to(self.mean_a.dtype), min=self.momentum)
        self.mean_a.lerp_(a.detach().mean(0).to(self.mean_a.dtype), m)
        self.mean_v.lerp_(v.detach().mean(0).to(self.mean_v.dtype), m)
        n += 1

    def unimodal(self, a, v):
        """The unimodal estimates with the current means (no update)."""
        return self.fuse(a, self.mean_v.to(v.dtype).expand_as(v)), self.fuse(self.mean_a.to(a.dtype).expand_as(a), v)

    def forward(self, a, v):
        if self.training:
            self._update_means(a, v)
        return (self.fuse(a, v), *self.unimodal(a, v))


class FiLMHead(_MeanSubstitutionHead):
    """Audio conditions visual: ``gamma, beta = split(Linear(a))``; ``Linear(gamma * v + beta)``."""

    def __init__(self, da: int, dv: int, num_classes: int):
        super().__init__(da, dv)
        self.film = nn.Linear(da, 2 * dv)
        self.fc_out = nn.Linear(dv, num_classes)

    def fuse(self, a, v):
        gamma, beta = self.film(a).chunk(2, dim=1)
        return self.fc_out(gamma * v + beta)


class GatedHead(_MeanSubstitutionHead):
    """Audio gates visual: ``Linear(sigmoid(Linear(a)) * Linear(v))`` (hidden width = dv)."""

    def __init__(self, da: int, dv: int, num_classes: int):
        super().__init__(da, dv)
        self.fc_a = nn.Linear(da, dv)
        self.fc_v = nn.Linear(dv, dv)
        self.fc_out = nn.Linear(dv, num_classes)

    def fuse(self, a, v):
        return self.fc_out(torch.sigmoid(self.fc_a(a)) * self.fc_v(v))


HEADS = {"concat": ConcatHead, "sum": SumHead, "film": FiLMHead, "gated": GatedHead}


# ---------------------------------------------------------------- the model

class AVModel(nn.Module):
    """Audio encoder + visual encoder + fusion head, or one encoder + linear head (unimodal).

    ``forward(audio, visual, feature_hook=None)``: ``feature_hook(feat_a, feat_v)`` may replace
    the pooled features before the head (modality-drop); the output's features are the hooked ones.
    A hook with a ``stage(i, maps)`` attribute (mid-fusion methods: greedy) is also called after
    each of the encoders' stages, which then run interleaved (``_mid_fusion``).
    A unimodal model ignores the other input (it may be None).
    """

    def __init__(self, arch: str, fusion: str, num_classes: int, modality: str = "both",
                 head_init: str = "xavier", audio_arch: str = "same", audio_bins: int | None = None):
        super().__init__()
        self.arch, self.fusion, self.modality, self.num_classes = arch, fusion, modality, num_classes
        audio = make_audio_encoder(arch, audio_arch, audio_bins) if modality in ("both", "audio") else None
        visual = VisualEncoder(arch) if modality in ("both", "visual") else None
        self.audio_encoder, self.visual_encoder = audio, visual
        self.head: nn.Module
        if audio is not None and visual is not None:
            self.head = HEADS[fusion](audio.out_dim, visual.out_dim, num_classes)
        else:
            enc = audio or visual
            assert enc is not None      # a MODALITIES value has at least one encoder
            self.head = nn.Linear(enc.out_dim, num_classes)
        if head_init == "xavier":  # the reference code's weight_init: xavier-normal weights, zero bias
            for m in self.head.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_normal_(m.weight)
                    nn.init.zeros_(m.bias)

    def unimodal_logits(self, feat_a, feat_v):
        """The head's estimate of each modality's logits from these features (no state update)."""
        if self.modality != "both":
            raise ValueError("unimodal_logits needs an audio-visual model")
        return self.head.unimodal(feat_a, feat_v)

    def forward(self, audio, visual, feature_hook: FeatureHook | None = None) -> ModelOutput:
        enc_a, enc_v = self.audio_encoder, self.visual_encoder
        if enc_v is None:           # --modality audio
            assert enc_a is not None
            feat = enc_a(audio)
            logits = self.head(feat)
            return ModelOutput(logits, logits, None, feat, None)
        if enc_a is None:           # --modality visual
            feat = enc_v(visual)
            logits = self.head(feat)
            return ModelOutput(logits, None, logits, None, feat)
        stage_hook = getattr(feature_hook, "stage", None)
        if stage_hook is not None:
            feat_a, feat_v = self._mid_fusion(audio, visual, stage_hook)
        else:
            feat_a, feat_v = enc_a(audio), enc_v(visual)
        if feature_hook is not None:
            feat_a, feat_v = feature_hook(feat_a, feat_v)
        logits, logits_a, logits_v = self.head(feat_a, feat_v)
        return ModelOutput(logits, logits_a, logits_v, feat_a, feat_v)

    @staticmethod
    def _stages(encoders: dict) -> dict | None:
        """Channels after each stage, when both encoders are trunks that run stage by stage (not x-vector)."""
        trunks = {u: t for u, e in encoders.items()
                  if isinstance(t := getattr(e, "trunk", None), (ResNet18Trunk, SmallTrunk))}
        if len(trunks) < 2:
            return None
        return {u: t.widths for u, t in trunks.items()}

    def _mid_fusion(self, audio, visual, stage_hook):
        """Both encoders stage by stage, ``stage_hook(i, maps)`` after each stage: maps are
        (B, C, F, T) audio and (B, C, n, h, w) visual (a view of the frames' maps), the same
        layouts go back."""
        a, v, b = audio, visual.flatten(0, 1), visual.shape[0]
        for i in range(len(self.audio_encoder.trunk.widths)):
            a, v = self.audio_encoder.trunk.stage(i, a), self.visual_encoder.trunk.stage(i, v)
            maps = stage_hook(i, {"audio": a, "visual": v.unflatten(0, (b, -1)).transpose(1, 2)})
            a, v = maps["audio"], maps["visual"].transpose(1, 2).flatten(0, 1)
        return self.audio_encoder.pool(a), self.visual_encoder.pool(v, b)

    def modalities(self, scope: str = "conv") -> Modalities:
        """The model side of the plug-in API: modalities "audio" and "visual" (those this model
        has), each encoder's parameters, the modulated ones of ``scope`` ("conv": the conv
        weights, as the reference code; "all": every encoder parameter), the forward, the head's
        unimodal logits and its Linear weights (AGM's clipping rule)."""
        if scope not in SCOPES:
            raise ConfigError(f"modulation scope must be one of {', '.join(SCOPES)}, not {scope!r}")
        encoders = {u: e for u in ("audio", "visual") if (e := self.encoder(u)) is not None}
        names = list(encoders)
        return Modalities(self, encoders, modulated={u: [p for _, p in self.modulated_parameters(u, scope)]
                                                     for u in names},
                          forward=_forward, unimodal=_unimodal if self.modality == "both" else None,
                          head=[m.weight for m in self.head.modules() if isinstance(m, nn.Linear)],
                          num_classes=self.num_classes, dims={u: e.out_dim for u, e in encoders.items()},
                          stages=self._stages(encoders))

    def encoder(self, modality: str) -> AudioEncoder | XVector | VisualEncoder | None:
        """The encoder of ``modality`` ("audio" or "visual"); None when the model lacks it."""
        if modality not in ("audio", "visual"):
            raise ValueError(f"modality must be 'audio' or 'visual', not {modality!r}")
        return self.audio_encoder if modality == "audio" else self.visual_encoder

    def modulated_parameters(self, modality: str, scope: str = "conv") -> list[tuple[str, torch.Tensor]]:
        """Parameters whose gradients OGM-GE modulates for ``modality``, in a fixed order.

        ``conv``: the encoder's conv weights (the 4-D tensors the reference code selects);
        ``all``: every encoder parameter (BatchNorm affine parameters too). Empty when the
        model has no such encoder.
        """
        if scope not in ("conv", "all"):
            raise ValueError(f"scope must be 'conv' or 'all', not {scope!r}")
        enc = self.encoder(modality)
        if enc is None:
            return []
        prefix = f"{modality}_encoder."
        if scope == "all":
            return [(prefix + n, p) for n, p in enc.named_parameters()]
        return [(f"{prefix}{n}.weight", m.weight) for n, m in enc.named_modules() if isinstance(m, WEIGHT_LAYERS)]


def build_model(arch: str, fusion: str, num_classes: int, modality: str = "both",
                head_init: str = "xavier", audio_arch: str = "same", audio_bins: int | None = None) -> AVModel:
    """The model of README: Training, randomly initialised (no pretrained weights).

    ``head_init``: ``xavier`` (the reference code: xavier-normal weights, zero bias, every Linear
    of the head) or ``torch`` (PyTorch's default Linear initialisation).

    ``fusion`` is ignored for unimodal models (``modality`` "audio" or "visual"): they are one
    encoder and a linear classifier, the paper's audio-only / visual-only baselines.
    """
    for what, value, allowed in (("arch", arch, ARCHS), ("fusion", fusion, FUSIONS), ("modality", modality, MODALITIES),
                                 ("head_init", head_init, HEAD_INITS)):
        if value not in allowed:
            raise ConfigError(f"{what} must be one of {', '.join(allowed)}, not {value!r}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, not {num_classes}")
    return AVModel(arch, fusion, num_classes, modality, head_init, audio_arch, audio_bins)
