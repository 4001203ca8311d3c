"""Models of other audio-visual frameworks, one module each (README: Models of other frameworks):
the OGM-GE paper's Table 3 (``tsn-av``, ``tsm-av``, ``tbn``, ``psp``) and Table 5 (``avga``,
``psp`` with ``task="localisation"``) models on this build's encoders, each with the plug-in API's
model side (``Framework.modalities()``). ``build(cfg, num_classes)`` makes the model a
``TrainConfig`` names (``model="av"``: ``ogmge_train.models.AVModel``)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..models import AVModel, build_model
from ..names import MODEL_TASKS, MODELS
from ._base import Framework
from .avga import AVGA
from .psp import PSP
from .tbn import TBN
from .tsm import TSMAV
from .tsn import TSNAV

__all__ = ["FRAMEWORKS", "Framework", "Model", "build", "load_encoder_weights"]

# what build() makes: ours or a framework's
Model = AVModel | Framework

FRAMEWORKS: dict[str, type[Framework]] = {"tsn-av": TSNAV, "tsm-av": TSMAV, "tbn": TBN, "psp": PSP, "avga": AVGA}
if set(FRAMEWORKS) != set(MODELS) - {"av"}:
    raise ImportError(f"names.MODELS and frameworks disagree: {sorted(set(FRAMEWORKS) ^ (set(MODELS) - {'av'}))}")


def build(cfg, num_classes: int, *, encoder_weights: bool = True) -> Model:
    """The model of ``cfg`` (``model``, ``arch``, ``audio_arch``, ...), randomly initialised; with
    ``encoder_weights`` its encoders are then loaded from ``cfg.encoder_weights`` (when set) and
    frozen with ``cfg.freeze_encoders``. (Loading a run's checkpoint passes False: the checkpoint
    holds every weight.)"""
    if cfg.task not in MODEL_TASKS[cfg.model]:
        raise ConfigError(f"--model {cfg.model} is for {' or '.join(MODEL_TASKS[cfg.model])}, not --task {cfg.task}")
    if cfg.model == "av":
        model: Model = build_model(cfg.arch, cfg.fusion, num_classes, cfg.modality, cfg.head_init, cfg.audio_arch,
                            cfg.audio_bins)
    else:
        if cfg.modality != "both":
            raise ConfigError(f"--model {cfg.model} is audio-visual; --modality {cfg.modality} needs --model av")
        cls = FRAMEWORKS[cfg.model]
        options = {k: getattr(cfg, k) for k in cls.options}
        model = cls(arch=cfg.arch, num_classes=num_classes, frames=cfg.frames, audio_arch=cfg.audio_arch,
                    audio_bins=cfg.audio_bins, head_init=cfg.head_init, **options)
    if encoder_weights and cfg.encoder_weights:
        load_encoder_weights(model, cfg.encoder_weights)
    if encoder_weights and cfg.freeze_encoders:
        if not isinstance(model, Framework):
            raise ConfigError("--freeze-encoders is for the frameworks' models (--model), not --model av")
        model.freeze_encoders()
    return model


def load_encoder_weights(model: nn.Module, path) -> list[str]:
    """Load the encoders' weights from a state dict file (``torch.save``; loaded with
    ``weights_only=True``): keys ``audio_encoder.*`` and/or ``visual_encoder.*``, as in a model's
    ``state_dict()`` or a run's checkpoint (``{"model": ...}``). Each encoder present in the file
    is loaded strictly (every key, every shape); returns the encoders loaded."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such encoder state dict (--encoder-weights)") from None
    except Exception as e:      # a foreign or truncated file: one line
        raise ConfigError(f"{path}: not a loadable state dict ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    loaded = []
    for name in ("audio_encoder", "visual_encoder"):
        prefix = name + "."
        part = {k[len(prefix):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}
        if not part:
            continue
        try:
            getattr(model, name).load_state_dict(part)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise ConfigError(f"{path}: does not fit this model's {name} ({first[0] if first else e})") from None
        loaded.append(name)
    if not loaded:
        raise ConfigError(f"{path}: no audio_encoder.* or visual_encoder.* weights in this state dict")
    return loaded
