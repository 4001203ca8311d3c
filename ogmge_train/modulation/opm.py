"""``opm`` and ``opm-ge``: On-the-fly Prediction Modulation (Wei, Hu, Du, Wen, TPAMI 2024).

In the forward pass of every active training step, the dominant modality's pooled features are
dropped per sample, with a probability that grows with the discrepancy:

- ``s_u`` = summed softmax probability of the true class of the unimodal logits computed from
  the *undropped* features (as OGM's, all-reduced under DDP);
- ``q_u = clip(q_base * (1 + lam * tanh(relu(s_u / s_w - 1))), 0, 1)`` when ``s_u / s_w > 1``,
  else 0 (w the other modality), so only the dominant modality is ever dropped;
- with probability ``p_exe`` the step drops: each sample keeps modality u with probability
  ``1 - q_u`` (features times a Bernoulli mask), and both features are divided by ``1 - theta``,
  ``theta = (d_a q_a + d_v q_v) / (d_a + d_v)`` (d_u: feature widths), in forward and backward.

The loss is the cross-entropy of the fused logits. A sample losing both modalities would be left
out of the loss, but cannot happen: one of q_a, q_v is always 0. ``opm-ge`` adds the GE noise of
OGM-GE (``N(0, std(g))`` per encoder conv-weight gradient, both modalities, no scaling) after
backward, in the active epochs. The reference code works on the concatenation head only; the
additive sum head has the same exact unimodal logits, so both are allowed; film and gated are not.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch

from ..names import METHOD_FUSIONS
from .base import Method, Step, unimodal_scores

if TYPE_CHECKING:
    from ..models import AVModel


def drop_probabilities(scores: torch.Tensor, q_base: float, lam: float) -> torch.Tensor:
    """``[q_a, q_v]`` from ``scores = [s_a, s_v]`` (tensors, no host sync)."""
    ratio = torch.stack([scores[0] / scores[1], scores[1] / scores[0]])
    excess = torch.tanh(torch.relu(ratio - 1))
    q = torch.where(excess > 0, q_base * (1 + lam * excess), torch.zeros_like(excess))
    return q.clamp(0.0, 1.0)


def drop(feat_a: torch.Tensor, feat_v: torch.Tensor, q: torch.Tensor, keep: torch.Tensor):
    """The features after the drop: ``keep`` is the (2, B, 1) 0/1 mask, ``q`` = [q_a, q_v]."""
    d = torch.tensor([feat_a.shape[1], feat_v.shape[1]], dtype=q.dtype, device=q.device)
    theta = (d * q).sum() / d.sum()
    scale = (1 / (1 - theta)).to(feat_a.dtype)
    return feat_a * keep[0].to(feat_a.dtype) * scale, feat_v * keep[1].to(feat_v.dtype) * scale


class OPM(Method):
    name = "opm"
    fusions = METHOD_FUSIONS["opm"]
    options = ("opm_q_base", "opm_lam", "opm_p_exe")

    def __init__(self, *, opm_q_base: float = 0.5, opm_lam: float = 0.5, opm_p_exe: float = 0.7, **kwargs):
        super().__init__(**kwargs)
        for what, value in (("opm_q_base", opm_q_base), ("opm_p_exe", opm_p_exe)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{what} must be in [0, 1], not {value}")
        if opm_lam < 0:
            raise ValueError(f"opm_lam must be >= 0, not {opm_lam}")
        self.q_base, self.lam, self.p_exe = float(opm_q_base), float(opm_lam), float(opm_p_exe)
        self.last_q: torch.Tensor | None = None   # the step's [q_a, q_v] (0 when it did not drop)

    def transform_features(self, feat_a, feat_v, *, training: bool, step: Step | None = None):
        self.last_q = None
        if not training or step is None or not self.active(step.epoch):
            return feat_a, feat_v
        with torch.no_grad():
            model = cast("AVModel", step.model)     # the unwrapped AVModel (see Step)
            logits_a, logits_v = model.unimodal_logits(feat_a.detach(), feat_v.detach())
            scores = step.reduce(unimodal_scores(logits_a, logits_v, step.labels))
            q = drop_probabilities(scores, self.q_base, self.lam).float()
        # the step-level coin first (CPU global RNG: no device sync), then the per-sample masks
        if torch.rand(()) >= self.p_exe:
            self.last_q = torch.zeros_like(q)
            return feat_a, feat_v
        keep = (torch.rand(2, feat_a.shape[0], 1, device=feat_a.device) >= q.view(2, 1, 1)).float()
        self.last_q = q
        return drop(feat_a, feat_v, q, keep)

    def after_backward(self, model, out, labels, *, epoch: int, all_reduce=None, generator=None):
        stats = super().after_backward(model, out, labels, epoch=epoch, all_reduce=all_reduce, generator=generator)
        q = self.last_q
        stats["q_a"], stats["q_v"] = (0.0, 0.0) if q is None else q.tolist()
        return stats


class OPMGE(OPM):
    name = "opm-ge"
    fusions = METHOD_FUSIONS["opm-ge"]
    noise = True
