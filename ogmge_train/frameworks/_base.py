"""What every model of another framework shares (README: Models of other frameworks).

A ``Framework`` is an audio encoder, a visual encoder (this build's ResNet-18 or small trunks,
``--audio-arch xvector`` too), the framework's own layers, and the model side of the plug-in API
(``modalities()``, as ``AVModel.modalities()``). Subclasses give three pieces:

- ``encode(audio, visual) -> {modality: (R, D_u)}``: each modality's features at the *fusion
  point*, one row per prediction (R = B clips, or B x S segments for localisation), flattened
  when the fusion reads several vectors per row (TBN's windows, PSP's segments);
- ``fuse(features) -> (logits, extra)``: the framework's fusion and classifier on them (``extra``:
  what ``model_loss`` needs, or None);
- ``unimodal(features)``: each modality's own scores. For frameworks whose streams meet only in
  the scores (TSN-AV, TSM-AV) these are exact; where the modalities interact before the classifier
  (TBN, PSP, AVGA) the default is *mean substitution*: the fusion and classifier evaluated on the
  modality's own features with every other modality's features replaced by their running mean,
  the rule this build's film and gated heads use (README: Models of other frameworks, why).

A modality's *stream* is its encoder plus the layers that read that modality alone before the
fusion point (``streams``); its parameters are what the methods balance, and the "conv" scope
modulates their weight tensors (conv, linear and recurrent weights; for ResNet encoders exactly the
reference code's conv weights). The layers from the fusion point on are the head.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from ..errors import ConfigError
from ..modalities import Modalities, Output
from ..models import VisualEncoder, make_audio_encoder
from ..names import SCOPES

NAMES = ("audio", "visual")


class RunningMeans(nn.Module):
    """Running means of each modality's fusion-point features (buffers, saved with the model): the
    plain average of the first 10 training batches, then an EMA with momentum 0.1, as the
    mean-substitution heads of ``ogmge_train.models``."""

    momentum = 0.1
    num_batches_tracked: torch.Tensor

    def __init__(self, dims: dict[str, int]):
        super().__init__()
        for u, d in dims.items():
            self.register_buffer(f"mean_{u}", torch.zeros(d))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def mean(self, u: str) -> torch.Tensor:
        return self._buffers[f"mean_{u}"]  # type: ignore[return-value]

    @torch.no_grad()
    def update(self, features: dict[str, torch.Tensor]) -> None:
        n = self.num_batches_tracked
        m = torch.clamp(1.0 / (n + 1).float(), min=self.momentum)    # no host sync
        for u, f in features.items():
            buf = self.mean(u)
            buf.lerp_(f.detach().float().mean(0).to(buf.dtype), m.to(buf.dtype))
        n += 1


def split_time(audio: torch.Tensor, segments: int, time_axis: int = 3) -> torch.Tensor:
    """(B, 1, F, T) -> (B, S, 1, F, T // S): S equal consecutive chunks (the last T mod S frames
    are dropped), e.g. ten 1 s chunks of a 10 s AVE spectrogram. ``time_axis`` 2 for fbank
    spectrograms (B, 1, T, mel)."""
    t = audio.shape[time_axis]
    if t < segments:
        raise ValueError(f"a spectrogram of {t} frames cannot be cut into {segments} segments")
    size = t // segments
    chunks = audio.narrow(time_axis, 0, size * segments).split(size, dim=time_axis)
    return torch.stack(chunks, dim=1)


def frame_maps(encoder: nn.Module, visual: torch.Tensor) -> torch.Tensor:
    """(B, n, 3, H, W) -> (B, n, D, h, w): the visual trunk's feature maps of every frame."""
    b, n = visual.shape[:2]
    trunk = cast(nn.Module, encoder.trunk)
    return trunk(visual.flatten(0, 1)).unflatten(0, (b, n))


def init_linears(modules, head_init: str) -> None:
    """xavier-normal weights and zero biases (this build's head default) or PyTorch's init."""
    if head_init != "xavier":
        return
    for mod in modules:
        for m in mod.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def width(encoder: nn.Module) -> int:
    """An encoder's feature width (its ``out_dim``)."""
    return int(vars(encoder)["out_dim"])


def _weights(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weight tensors of a module's conv, linear and recurrent layers (no biases, no norms)."""
    out = []
    for name, m in module.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            out.append((prefix + "weight", cast(nn.Parameter, m.weight)))
        elif isinstance(m, nn.LSTM):
            out += [(prefix + n, p) for n, p in m.named_parameters() if n.startswith("weight")]
    return out


def _forward(model, inputs: dict, hook) -> Output:
    return model(inputs.get("audio"), inputs.get("visual"), hook=hook)


def _unimodal(model, features: dict) -> dict:
    return getattr(model, "module", model).unimodal(features)


class Framework(nn.Module):
    """Base of the Table 3 and Table 5 models (see the module docstring)."""

    name = ""
    options: tuple[str, ...] = ()     # TrainConfig fields the model takes (build() passes these)
    task = "classification"
    modality = "both"            # what the trainer reads of a model (both modalities, always)
    exact_unimodal = False       # True: unimodal() is exact, no running means are kept
    has_model_loss = False       # True: model_loss() adds the framework's own loss terms

    def __init__(self, *, arch: str, num_classes: int, frames: int, audio_arch: str = "same",
                 audio_bins: int | None = None, visual_encoder: VisualEncoder | None = None, head_init: str = "xavier"):
        super().__init__()
        if frames < 1:
            raise ConfigError(f"{self.name}: needs at least one frame per clip, not {frames}")
        self.arch, self.frames = arch, frames
        # classes of the task (localisation adds the background class, the last index)
        self.num_classes = num_classes + (1 if self.task == "localisation" else 0)
        self.audio_encoder: nn.Module = make_audio_encoder(arch, audio_arch, audio_bins)
        self.visual_encoder: nn.Module = visual_encoder if visual_encoder is not None else VisualEncoder(arch)
        self.audio_dim, self.visual_dim = width(self.audio_encoder), width(self.visual_encoder)
        self.audio_bins = audio_bins
        self.frozen: tuple[str, ...] = ()
        self.head_init = head_init

    # -- the pieces subclasses give

    def encode(self, audio: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def fuse(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, object]:
        raise NotImplementedError

    def streams(self) -> dict[str, list[nn.Module]]:
        """Each modality's own modules (encoder first)."""
        return {"audio": [self.audio_encoder], "visual": [self.visual_encoder]}

    def head_modules(self) -> list[nn.Module]:
        """The modules from the fusion point on (AGM clips by their weights)."""
        raise NotImplementedError

    def feature_dims(self) -> dict[str, int]:
        raise NotImplementedError

    def model_loss(self, extra, labels: torch.Tensor) -> torch.Tensor:
        """The framework's own loss terms (PSP's AVPS loss; ``has_model_loss``)."""
        raise NotImplementedError

    # -- shared

    def time_axis(self, audio: torch.Tensor) -> int:
        """The spectrogram's time axis: 3 for (B, 1, F, T), 2 for fbank's (B, 1, T, mel)."""
        if self.audio_bins and audio.shape[2] != self.audio_bins and audio.shape[3] == self.audio_bins:
            return 2
        return 3

    def finish(self) -> None:
        """End of a subclass's ``__init__``: the head's initialisation and the running means."""
        init_linears(self.head_modules(), self.head_init)
        if not self.exact_unimodal:
            self.running = RunningMeans(self.feature_dims())

    def unimodal(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Mean substitution (no state update): modality u's logits are the fusion of u's own
        features with every other modality's running mean."""
        means = self.running
        out = {}
        for u in features:
            subst = {w: (f if w == u else means.mean(w).to(f.dtype).expand_as(f)) for w, f in features.items()}
            out[u] = self.fuse(subst)[0]
        return out

    def forward(self, audio, visual, hook: Callable[[dict], dict] | None = None) -> Output:
        features = self.encode(audio, visual)
        if self.training and not self.exact_unimodal:
            self.running.update(features)
        if hook is not None:
            features = hook(features)
        logits, extra = self.fuse(features)
        loss = None
        if self.training and self.has_model_loss:
            def loss(labels, extra=extra):
                return self.model_loss(extra, labels)
        return Output(logits, self.unimodal(features), features, model_loss=loss)

    def freeze_encoders(self) -> None:
        """Keep both encoders fixed (features as the AVE papers' precomputed ones): no gradients,
        BatchNorm statistics frozen (the encoders stay in eval mode while the model trains)."""
        self.frozen = NAMES
        for u in NAMES:
            self.encoder(u).requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for u in self.frozen:
            self.encoder(u).eval()
        return self

    def encoder(self, modality: str) -> nn.Module:
        if modality not in NAMES:
            raise ValueError(f"modality must be 'audio' or 'visual', not {modality!r}")
        return self.audio_encoder if modality == "audio" else self.visual_encoder

    def modulated_parameters(self, modality: str, scope: str = "conv") -> list[tuple[str, nn.Parameter]]:
        """The stream's parameters whose gradients OGM/GE/AGM change: ``conv`` its weight tensors,
        ``all`` every parameter (trainable ones only: frozen encoders have no gradient)."""
        if scope not in SCOPES:
            raise ConfigError(f"modulation scope must be one of {', '.join(SCOPES)}, not {scope!r}")
        names = {id(p): n for n, p in self.named_parameters()}
        out = []
        for mod in self.streams()[modality]:
            pairs = _weights(mod) if scope == "conv" else list(mod.named_parameters())
            out += [(names[id(p)], p) for _, p in pairs if p.requires_grad]
        return out

    def modalities(self, scope: str = "conv") -> Modalities:
        """The model side of the plug-in API: modalities "audio" and "visual" (their streams),
        the modulated parameters of ``scope``, forward, unimodal scores and head."""
        streams = self.streams()
        params = {u: [p for mod in streams[u] for p in mod.parameters() if p.requires_grad] for u in NAMES}
        return Modalities(self, params, modulated={u: [p for _, p in self.modulated_parameters(u, scope)]
                                                   for u in NAMES},
                          forward=_forward, unimodal=_unimodal,
                          head=[cast(nn.Parameter, m.weight) for mod in self.head_modules() for m in mod.modules()
                                if isinstance(m, nn.Linear)],
                          num_classes=self.num_classes, dims=self.feature_dims())


__all__ = ["NAMES", "Framework", "RunningMeans", "frame_maps", "init_linears", "split_time", "width"]
