"""``lfm``: "Facilitating Multimodal Classification via Dynamically Learning Modality Gap" (Yang et
al., NeurIPS 2024): the supervised loss and a modality-alignment loss mixed with weights that change
over training, as the official ``Crema_epoch.py`` (njustkmg/NeurIPS24-LFM, the script its README
runs: the "learning-fitted" strategy that BalanceBenchmark's ``trainer_config.yaml`` names).

For epoch e (counted from 0) and the modalities' own logits ``z_u`` (the additive head's parts,
summing to the fused logits ``z``):

    ``L = 2 (a_e CE(mean_u z_u, y) + (1 - a_e) D)``,  ``D = mean over pairs (u, w) of A(z_u, z_w)``,
    ``A(p, q) = (KL(m || p) + KL(m || q)) / 2``,  ``m = (softmax p + softmax q) / 2``,

KL summed over classes and averaged over the batch (the official ``Alignment``: ``F.kl_div(p.log(),
m, reduction="batchmean")``, which is ``KL(m || p)``; the code calls it a JS score). ``a_e`` is the
official fitted quintic ``sum_i c_i e^i`` (0.2046 at e = 0, 0.50 at e = 80, 0.92 at e = 199; it was
fitted on 200 epochs and leaves [0, 1] after them), clamped to [0.05, 0.95] (the learnable variant's
bounds). For two modalities ``mean_u z_u = z / 2``. The method is the training objective: it applies
in every epoch (the window does not cut it, as in both codes). Evaluation: the fused logits (the
official argmax of ``(z_a + z_v) / 2``). ``--fusion concat`` or ``sum`` (film/gated logits are not a
sum of per-modality parts); any number of modalities. Step stats: ``lfm_alpha`` (a_e), ``lfm_align`` (D).
"""
from __future__ import annotations

from itertools import combinations

import torch
import torch.nn.functional as F

from ..modalities import Output
from ..names import METHOD_FUSIONS
from .base import Method, Step

# The official getAlpha_Learnable_Fitted: the classification weight's coefficients (the alignment
# weight's are 1 minus the first and the negatives of the others: the two weights sum to 1).
FITTED = (2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08, -5.39717505e-11)
BOUNDS = (0.05, 0.95)


def fitted_weight(epoch: int) -> float:
    """``a_e``: the classification loss's weight in epoch ``epoch``."""
    a = sum(c * epoch ** i for i, c in enumerate(FITTED))
    return min(BOUNDS[1], max(BOUNDS[0], a))


def alignment(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``(KL(m || softmax p) + KL(m || softmax q)) / 2`` per batch mean, ``m`` the mean distribution."""
    lp, lq = p.log_softmax(dim=1), q.log_softmax(dim=1)
    m = (lp.exp() + lq.exp()) / 2
    return (F.kl_div(lp, m, reduction="batchmean") + F.kl_div(lq, m, reduction="batchmean")) / 2


class LFM(Method):
    name = "lfm"
    fusions = METHOD_FUSIONS["lfm"]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._terms: torch.Tensor | None = None

    def loss(self, out: Output, step: Step) -> torch.Tensor:
        names = step.modalities.names
        z = [out.unimodal[u].float() for u in names]
        a = fitted_weight(step.epoch)
        ce = F.cross_entropy(torch.stack(z).mean(0), step.labels)
        pairs = list(combinations(range(len(z)), 2))
        align = torch.stack([alignment(z[i], z[j]) for i, j in pairs]).mean()
        self._terms = torch.stack([align.detach(), align.new_tensor(a)])
        return 2 * (a * ce + (1 - a) * align)

    def after_backward(self, out: Output, step: Step) -> dict[str, float]:
        stats = super().after_backward(out, step)
        align, a = (0.0, fitted_weight(step.epoch)) if self._terms is None else self._terms.tolist()
        return {**stats, "lfm_alpha": a, "lfm_align": align}
