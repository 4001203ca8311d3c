"""``opm`` and ``opm-ge``: On-the-fly Prediction Modulation (Wei, Hu, Du, Wen, TPAMI 2024).

In the forward pass of every active training step, the dominant modality's pooled features are
dropped per sample, with a probability that grows with the discrepancy:

- ``s_u`` = summed softmax probability of the true class of the unimodal logits computed from
  the *undropped* features (as OGM's, all-reduced under DDP);
- ``q_u = clip(q_base * (1 + lam * tanh(relu(rho_u - 1))), 0, 1)`` when ``rho_u > 1``, else 0,
  with ``rho_u`` OGM's discrepancy (two modalities: ``s_u / s_w``, w the other), so only the
  dominant modality is ever dropped;
- with probability ``p_exe`` the step drops: each sample keeps modality u with probability
  ``1 - q_u`` (features times a Bernoulli mask), and all features are divided by ``1 - theta``,
  ``theta = sum_u d_u q_u / sum_u d_u`` (d_u: feature widths), in forward and backward.

The loss is the cross-entropy of the fused logits. A sample losing every modality would be left
out of the loss, but cannot happen: the weakest modality's q is always 0 (with more modalities
too: the lowest score is never above the mean of the others). ``opm-ge`` adds the GE noise of
OGM-GE (``--ge-noise``, encoder conv-weight gradients, every modality, no scaling) after
backward, in the active epochs. The reference code works on the concatenation head only; the
additive sum head has the same exact unimodal logits, so both are allowed; film and gated are not.
A model of one's own gives the unimodal logits of its features (``Modalities(unimodal=...)``).
"""
from __future__ import annotations

import torch

from ..names import METHOD_FUSIONS
from .base import Method, Step, discrepancy, unimodal_scores


def drop_probabilities(scores: torch.Tensor, q_base: float, lam: float) -> torch.Tensor:
    """``[q_u]`` from ``scores = [s_u]`` (tensors, no host sync)."""
    excess = torch.tanh(torch.relu(discrepancy(scores) - 1))
    q = torch.where(excess > 0, q_base * (1 + lam * excess), torch.zeros_like(excess))
    return q.clamp(0.0, 1.0)


def drop(features: dict[str, torch.Tensor], q: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """The features after the drop: ``keep`` is the (M, B, 1) 0/1 mask, ``q`` = [q_u]."""
    d = torch.tensor([f.shape[1] for f in features.values()], dtype=q.dtype, device=q.device)
    theta = (d * q).sum() / d.sum()
    scale = 1 / (1 - theta)
    return {u: f * keep[i].to(f.dtype) * scale.to(f.dtype) for i, (u, f) in enumerate(features.items())}


class OPM(Method):
    name = "opm"
    fusions = METHOD_FUSIONS["opm"]
    options: tuple[str, ...] = ("opm_q_base", "opm_lam", "opm_p_exe")
    needs = ("unimodal",)
    accumulation = False     # q comes from the batch's scores in the forward pass

    def __init__(self, *, opm_q_base: float = 0.5, opm_lam: float = 0.5, opm_p_exe: float = 0.7, **kwargs):
        super().__init__(**kwargs)
        for what, value in (("opm_q_base", opm_q_base), ("opm_p_exe", opm_p_exe)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{what} must be in [0, 1], not {value}")
        if opm_lam < 0:
            raise ValueError(f"opm_lam must be >= 0, not {opm_lam}")
        self.q_base, self.lam, self.p_exe = float(opm_q_base), float(opm_lam), float(opm_p_exe)
        self.last_q: torch.Tensor | None = None   # the step's [q_u] (0 when it did not drop)

    def transform_features(self, features, *, training: bool, step: Step | None = None):
        self.last_q = None
        if not training or step is None or not self.active(step.epoch):
            return features
        names = step.modalities.names
        with torch.no_grad():
            logits = step.modalities.unimodal_logits({u: f.detach() for u, f in features.items()})
            scores = step.reduce(unimodal_scores(logits, names, step.labels))
            q = drop_probabilities(scores, self.q_base, self.lam).float()
        # the step-level coin first (CPU global RNG: no device sync), then the per-sample masks
        if torch.rand(()) >= self.p_exe:
            self.last_q = torch.zeros_like(q)
            return features
        first = features[names[0]]
        keep = (torch.rand(len(names), first.shape[0], 1, device=first.device) >= q.view(-1, 1, 1)).float()
        self.last_q = q
        return drop(features, q, keep)

    def after_backward(self, out, step: Step):
        stats = super().after_backward(out, step)
        q = self.last_q
        tags = [step.modalities.tags[u] for u in step.modalities.names]
        stats.update(zip((f"q_{t}" for t in tags), [0.0] * len(tags) if q is None else q.tolist()))
        return stats


class OPMGE(OPM):
    name = "opm-ge"
    fusions = METHOD_FUSIONS["opm-ge"]
    options = (*OPM.options, "ge_noise")
    noise = True
