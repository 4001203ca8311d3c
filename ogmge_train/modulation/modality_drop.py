"""``modality-drop``: the paper's Table 2 comparison (modality dropout before fusion).

In training, each sample independently loses a modality with probability ``drop_p``. Which one
is set by ``drop_modality``: ``audio`` or ``visual`` (the paper's two Table 2 rows: always that
modality), or ``either`` (a fair coin per dropped sample, never both). The dropped modality's
pooled features are set to zero (no 1/(1-p) rescaling, as in ModDrop), or, with
``drop_at="input"`` (the paper's Modality-Drop), its input: the spectrogram or frames the
encoder receives (zeroed in place in ``begin_step``: ``Step.audio``/``Step.visual`` are the
tensors the training forward pass gets), so the dropped sample also reaches the encoder's
BatchNorm statistics as zeros. Evaluation sees everything. Gradients are not modulated. Draws
use torch's global RNG on the features' device (seeded by the loop); ranks need not agree, since
each rank drops within its own samples.
"""
import torch

from ..names import DROP_AT, DROP_MODALITIES
from .base import Method


class ModalityDrop(Method):
    name = "modality-drop"
    options = ("drop_p", "drop_modality", "drop_at")

    def __init__(self, *, drop_p: float = 0.5, drop_modality: str = "either", drop_at: str = "features", **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= drop_p < 1.0:
            raise ValueError(f"drop_p must be in [0, 1), not {drop_p}")
        if drop_modality not in DROP_MODALITIES:
            raise ValueError(f"drop_modality must be one of {', '.join(DROP_MODALITIES)}, not {drop_modality!r}")
        if drop_at not in DROP_AT:
            raise ValueError(f"drop_at must be one of {', '.join(DROP_AT)}, not {drop_at!r}")
        self.drop_p, self.drop_modality, self.drop_at = float(drop_p), drop_modality, drop_at

    def _keep(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep_a, keep_v): bool (n,) masks of the samples that keep each modality."""
        u = torch.rand(2, n, device=device)
        drop = u[0] < self.drop_p
        if self.drop_modality == "either":
            audio = u[1] < 0.5                  # which modality a dropped sample loses
        else:                                   # the second draw is still made: one RNG use for all
            audio = torch.full_like(drop, self.drop_modality == "audio")
        return ~(drop & audio), ~(drop & ~audio)

    def begin_step(self, step) -> None:
        if self.drop_at != "input" or self.drop_p == 0.0 or step.audio is None or step.visual is None:
            return
        keep_a, keep_v = self._keep(step.audio.shape[0], step.audio.device)
        step.audio.mul_(keep_a.to(step.audio.dtype).view(-1, *[1] * (step.audio.dim() - 1)))
        step.visual.mul_(keep_v.to(step.visual.dtype).view(-1, *[1] * (step.visual.dim() - 1)))

    def transform_features(self, feat_a, feat_v, *, training: bool, step=None):
        if not training or self.drop_p == 0.0 or self.drop_at != "features":
            return feat_a, feat_v
        keep_a, keep_v = self._keep(feat_a.shape[0], feat_a.device)
        return feat_a * keep_a.to(feat_a.dtype).view(-1, 1), feat_v * keep_v.to(feat_v.dtype).view(-1, 1)
