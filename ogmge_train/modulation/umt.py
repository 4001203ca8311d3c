"""``umt``: Uni-Modal Teacher (Du, Teng, Li, Liu, Yuan, Wang, Yuan, Zhao, ICML 2023, "On Uni-Modal
Feature Learning in Supervised Multi-Modal Learning"): uni-modal models trained first, their
features distilled into the multi-modal model's encoders.

With ``t_u(x_u)`` the pooled features of modality u's teacher (frozen) and ``f_u`` the student's
pooled features of that modality (what fusion sees), the training loss is

    ``L = CE(z) + lambda * sum_u MSE(t_u(x_u), f_u)``,  ``MSE = mean over the B x D_u elements``,

in the active epochs, ``CE(z)`` alone outside them (BalanceBenchmark's ``UMT_trainer``, lambda =
``--umt-scaling`` 10, its ``trainer_config.yaml``). The gradient of the distillation term reaches
encoder u only (the teacher runs without gradient).

Teachers: a module per modality mapping that modality's input to its features, or, from the CLI,
the folder of a uni-modal run (``--modality audio`` / ``visual``, ``--umt-teacher-audio RUN``),
whose ``best.pt`` is loaded (BalanceBenchmark loads the uni-modal trainer's saved checkpoint, which
it saves at each new best). Teachers are loaded at the first ``begin_epoch`` (training only: a
finished run evaluates without them), moved to the model's device and dtype, kept in eval mode
(BalanceBenchmark leaves them in training mode: see README), never in the optimizer, the DDP
wrapper or our checkpoints; the method state records each teacher's path and the sha256 of its
checkpoint, and a resume refuses a teacher whose file changed. Every fusion; any number of
modalities (one teacher each). Step stats: ``umt_mse_<tag>`` (the unscaled MSE terms).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from avprep.shards import sha256_file

from .. import frameworks, runfolder
from ..config import TrainConfig
from ..errors import ConfigError
from ..modalities import Modalities, Output
from .base import EpochStart, Method, Step


class RunTeacher(nn.Module):
    """Modality u's features from the uni-modal model of a run folder (its ``best.pt``)."""

    def __init__(self, model: nn.Module, modality: str):
        super().__init__()
        self.model, self.modality = model, modality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x, None) if self.modality == "audio" else self.model(None, x)
        return out.feat_a if self.modality == "audio" else out.feat_v


def load_run_teacher(run: str | Path, modality: str, width: int | None) -> tuple[RunTeacher, str, str]:
    """The teacher of ``modality`` from uni-modal run folder ``run``, its checkpoint's absolute
    path and sha256; ``ConfigError`` (one line naming the run) if it is missing or does not fit."""
    path = runfolder.checkpoint_path(Path(run).resolve(), "best")
    what = f"umt teacher for {modality}: {path}"
    if not path.is_file():
        raise ConfigError(f"{what}: no such checkpoint (give the folder of a finished --modality {modality} run)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        cfg = TrainConfig.from_dict(ckpt["config"])
        classes = len(ckpt["classes"])
    except (ConfigError, KeyError, TypeError) as e:
        raise ConfigError(f"{what}: not a run checkpoint ({e})") from None
    except Exception as e:  # a truncated or foreign file
        raise ConfigError(f"{what}: not a loadable checkpoint ({type(e).__name__}: {e})") from None
    if cfg.model != "av" or cfg.modality != modality:
        raise ConfigError(f"{what}: a --model {cfg.model} --modality {cfg.modality} run, not a uni-modal "
                         f"--modality {modality} one")
    model = frameworks.build(cfg, classes, encoder_weights=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ConfigError(f"{what}: its weights do not fit the model its config describes "
                         f"({str(e).strip().splitlines()[-1].strip()})") from None
    teacher = RunTeacher(model, modality)
    have = getattr(model.encoder(modality), "out_dim", None)
    if width is not None and have != width:
        raise ConfigError(f"{what}: its {cfg.arch} features are {have}-d, this model's {modality} features {width}-d")
    return teacher, str(path), sha256_file(path)


class UMT(Method):
    name = "umt"
    options = ("umt_teacher_audio", "umt_teacher_visual", "umt_scaling")
    needs = ("inputs",)

    def __init__(self, *, teachers: Mapping[str, str | Path | nn.Module] | None = None,
                 umt_teacher_audio: str | None = None, umt_teacher_visual: str | None = None,
                 umt_scaling: float = 10.0, **kwargs):
        super().__init__(**kwargs)
        if umt_scaling < 0:
            raise ValueError(f"umt_scaling must be >= 0, not {umt_scaling}")
        given = {u: t for u, t in (("audio", umt_teacher_audio), ("visual", umt_teacher_visual)) if t}
        self.sources: dict[str, str | Path | nn.Module] = {**given, **(teachers or {})}
        self.scaling = float(umt_scaling)
        self.teachers: dict[str, nn.Module] | None = None
        self.record: dict[str, dict[str, str]] = {}      # run teachers: path and sha256 (method state)
        self._terms: torch.Tensor | None = None
        self._dims: dict[str, int] | None = None

    def setup(self, modalities: Modalities) -> nn.Module | None:
        missing = [u for u in modalities.names if u not in self.sources]
        if len(modalities.names) > 1 and missing:
            raise ValueError("needs a teacher for every modality: "
                             + ", ".join(f"--umt-teacher-{u} RUN (a --modality {u} run)" for u in missing))
        self._dims = modalities.dims
        return None

    def begin_epoch(self, start: EpochStart) -> None:
        if self.teachers is None and len(start.modalities.names) > 1:
            self.teachers = self._load(start.modalities)

    def _load(self, modalities: Modalities) -> dict[str, nn.Module]:
        like = next(modalities.model.parameters())
        teachers, record = {}, {}
        for u in modalities.names:
            source = self.sources[u]
            if isinstance(source, nn.Module):
                teacher = source
            else:
                teacher, path, sha = load_run_teacher(source, u, (self._dims or {}).get(u))
                old = self.record.get(u)
                if old is not None and old["sha256"] != sha:
                    raise ConfigError(f"umt teacher for {u}: {path} changed since this run started (sha256 "
                                     f"{old['sha256'][:12]}... then, {sha[:12]}... now)")
                record[u] = {"path": path, "sha256": sha}
            teacher.requires_grad_(False)
            teachers[u] = teacher.to(device=like.device, dtype=like.dtype).eval()
        self.record = record
        return teachers

    def loss(self, out: Output, step: Step) -> torch.Tensor:
        self._terms = None
        loss = F.cross_entropy(out.logits.float(), step.labels)
        if not self.active(step.epoch):
            return loss
        assert self.teachers is not None and step.inputs is not None, "umt: begin_epoch loads the teachers"
        terms = []
        for u in step.modalities.names:
            teacher = self.teachers[u].eval()
            with torch.no_grad():
                target = teacher(step.inputs[u])
            f = out.features[u]
            f = f.float() if f.dtype in (torch.float16, torch.bfloat16) else f     # autocast: MSE in float32
            terms.append(F.mse_loss(f, target.to(f.dtype)))
        mse = torch.stack(terms)
        self._terms = mse.detach()
        return loss + self.scaling * mse.sum()

    def after_backward(self, out: Output, step: Step) -> dict[str, float]:
        stats = super().after_backward(out, step)
        m = step.modalities
        values = [0.0] * len(m.names) if self._terms is None else self._terms.tolist()
        return {**stats, **{f"umt_mse_{m.tags[u]}": v for u, v in zip(m.names, values)}}

    def state_dict(self) -> dict:
        return {"teachers": {u: dict(r) for u, r in self.record.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.record = {u: dict(r) for u, r in state.get("teachers", {}).items()}
