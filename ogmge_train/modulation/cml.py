"""``cml``: Calibrating Multimodal Learning (Ma, Zhang, Zhang, Wu, Fu, Zhou, Hu, ICML 2023), as
BalanceBenchmark's CML trainer runs it for two modalities (the model side's first and second:
audio and visual for ours) (the principle: the confidence should
not increase when a modality is removed).

Before each training epoch one modality r is chosen to be removed (a fair coin from torch's
global generator, for the whole epoch, as the benchmark's shuffled modality list); the partial
prediction ``z_p`` is the kept modality's own logits (README: Training). In the active epochs

    L = (CE(z) + CE(z_p)) / 2 + lambda * max(0, sum_i (conf(z_p)_i - conf(z)_i))

with ``z`` the fused logits, ``conf`` the largest softmax probability of a sample and the sum over
the batch (``cml_lambda`` = 0.1, the benchmark's); outside them ``L = CE(z)``. Every fusion.
Step stats: ``cml_removed`` (0 the first modality, 1 the second) and ``cml_penalty`` (the clamped sum).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import EpochStart, Method, Step


def confidence_penalty(full: torch.Tensor, partial: torch.Tensor) -> torch.Tensor:
    """``max(0, sum_i (max softmax(partial)_i - max softmax(full)_i))``."""
    conf_s = full.float().softmax(dim=1).max(dim=1).values
    conf_p = partial.float().softmax(dim=1).max(dim=1).values
    return torch.clamp((conf_p - conf_s).sum(), min=0.0)


class CML(Method):
    name = "cml"
    options = ("cml_lambda",)
    max_modalities = 2

    def __init__(self, *, cml_lambda: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        if cml_lambda < 0:
            raise ValueError(f"cml_lambda must be >= 0, not {cml_lambda}")
        self.lam = float(cml_lambda)
        self.removed = 0
        self._penalty: torch.Tensor | None = None

    def begin_epoch(self, start: EpochStart) -> None:
        self.removed = int(torch.randint(2, ()))

    def loss(self, out, step: Step) -> torch.Tensor:
        self._penalty = None
        full = F.cross_entropy(out.logits.float(), step.labels)
        if not self.active(step.epoch):
            return full
        partial = out.unimodal[step.modalities.names[1 - self.removed]]
        self._penalty = confidence_penalty(out.logits, partial)
        return (full + F.cross_entropy(partial.float(), step.labels)) / 2 + self.lam * self._penalty

    def after_backward(self, out, step):
        stats = super().after_backward(out, step)
        penalty = 0.0 if self._penalty is None else float(self._penalty.detach())
        return {**stats, "cml_removed": float(self.removed), "cml_penalty": penalty}

    def state_dict(self) -> dict:
        return {"removed": torch.tensor(self.removed)}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.removed = int(state["removed"])
