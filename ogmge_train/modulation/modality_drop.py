"""``modality-drop``: the paper's Table 2 comparison (modality dropout before fusion).

In training, each sample independently loses a modality with probability ``drop_p``. Which one
is set by ``drop_modality``: ``audio`` or ``visual`` (the paper's two Table 2 rows: always that
modality), or ``either`` (a fair coin per dropped sample, never both). The dropped modality's
pooled features are set to zero (no 1/(1-p) rescaling, as in ModDrop). Evaluation sees all
features. Gradients are not modulated. Draws use torch's global RNG on the features' device
(seeded by the loop); ranks need not agree, since each rank drops within its own samples.
"""
import torch

from ..names import DROP_MODALITIES
from .base import Method


class ModalityDrop(Method):
    name = "modality-drop"
    options = ("drop_p", "drop_modality")

    def __init__(self, *, drop_p: float = 0.5, drop_modality: str = "either", **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= drop_p < 1.0:
            raise ValueError(f"drop_p must be in [0, 1), not {drop_p}")
        if drop_modality not in DROP_MODALITIES:
            raise ValueError(f"drop_modality must be one of {', '.join(DROP_MODALITIES)}, not {drop_modality!r}")
        self.drop_p, self.drop_modality = float(drop_p), drop_modality

    def transform_features(self, feat_a, feat_v, *, training: bool, step=None):
        if not training or self.drop_p == 0.0:
            return feat_a, feat_v
        u = torch.rand(2, feat_a.shape[0], 1, device=feat_a.device)
        drop = u[0] < self.drop_p
        if self.drop_modality == "either":
            audio = u[1] < 0.5                  # which modality a dropped sample loses
        else:                                   # the second draw is still made: one RNG use for all
            audio = torch.full_like(drop, self.drop_modality == "audio")
        keep_a = (~(drop & audio)).to(feat_a.dtype)
        keep_v = (~(drop & ~audio)).to(feat_v.dtype)
        return feat_a * keep_a, feat_v * keep_v
