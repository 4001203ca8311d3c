"""``modality-drop``: the paper's Table 2 comparison (modality dropout before fusion).

In training, each sample independently loses one modality with probability ``drop_p``: which
one is a fair coin (audio or visual, never both), and the dropped modality's pooled features
are set to zero (no 1/(1-p) rescaling, as in ModDrop). Evaluation sees all features. Gradients
are not modulated. Draws use torch's global RNG on the features' device (seeded by the loop);
ranks need not agree, since each rank drops within its own samples.
"""
import torch

from .base import Method


class ModalityDrop(Method):
    name = "modality-drop"

    def __init__(self, *, drop_p: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= drop_p < 1.0:
            raise ValueError(f"drop_p must be in [0, 1), not {drop_p}")
        self.drop_p = float(drop_p)

    def transform_features(self, feat_a, feat_v, *, training: bool):
        if not training or self.drop_p == 0.0:
            return feat_a, feat_v
        u = torch.rand(2, feat_a.shape[0], 1, device=feat_a.device)
        drop = u[0] < self.drop_p
        audio = u[1] < 0.5                      # which modality a dropped sample loses
        keep_a = (~(drop & audio)).to(feat_a.dtype)
        keep_v = (~(drop & ~audio)).to(feat_v.dtype)
        return feat_a * keep_a, feat_v * keep_v
