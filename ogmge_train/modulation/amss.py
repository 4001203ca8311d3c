"""``amss`` / ``amss-plus``: Adaptively Mask Subnetworks considering modal Significance (Yang, Pan,
Jiang, Xu, Tang, TPAMI 2025), as its official audio-visual code (``AMSS/train_test.py``).

Per step, after backward (two modalities u; B samples of the global batch, labels y, pooled
features f_u, each modality's logits z_u: ``W_u f_u + b/2`` for concat, as the official code):

- modal significance, a mutual-information rate ``r_u = (H(Y) - CE(z_u, y) + 0.5) / H_u`` with
  ``H(Y) = -sum_c p_c log p_c`` of the batch's label frequencies, ``CE`` the batch mean and
  ``H_u`` the mean entropy of ``softmax(f_u)`` (the 0.5 shift is the official code's);
- the share of each modality's elements to update, ``keep_u = softmax(-r / T)_u`` clamped to
  [0.1, 0.9] (``amss_temperature`` T = 0.2), 0.5 each when a numerator is <= 0: the more
  significant modality updates fewer elements;
- in the active epochs, for every modulated weight of modality u (our models: the encoder's conv
  weights) and each output unit j: Fisher importance ``F_j = sum g_j^2`` over the unit's gradient
  entries, ``p_j = F_j / sum F``; ``ceil(n keep_u)`` units drawn without replacement with
  probabilities p (``step.generator``: the same draw on every rank) keep their gradient, the others
  are zeroed; ``amss-plus`` scales a kept unit by ``1 / (p_j + 1/n)`` (the official AMSS+).

Every fusion (any head giving unimodal logits); two modalities. Under DDP the label counts, the
cross-entropy and entropy sums are all-reduced, so every rank computes the same ``keep_u``.
Step stats: ``amss_keep_<tag>``, ``amss_rate_<tag>``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Method, Step

SHIFT = 0.5             # the official code's constant in the numerator of the rate
KEEP_RANGE = (0.1, 0.9)  # the official limit_number


class AMSS(Method):
    name = "amss"
    rescale = False
    options = ("amss_temperature",)
    max_modalities = 2

    def __init__(self, *, amss_temperature: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        if not amss_temperature > 0:
            raise ValueError("amss_temperature must be > 0")
        self.temperature = float(amss_temperature)

    @torch.no_grad()
    def significance(self, out, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keep, rate)``, one float64 value per modality, from the (global) batch."""
        m, labels = step.modalities, step.labels
        classes = out.logits.shape[1]
        ce = [F.cross_entropy(out.unimodal[u].double(), labels, reduction="sum") for u in m.names]
        ent = [-(F.softmax(f, 1) * F.log_softmax(f, 1)).sum() for f in (out.features[u].double() for u in m.names)]
        vec = torch.cat([torch.bincount(labels, minlength=classes).double(), torch.stack(ce + ent)])
        vec = step.reduce(vec)
        k = len(m.names)
        counts, ce_sum, ent_sum = vec[:classes], vec[classes:classes + k], vec[classes + k:]
        n = counts.sum()
        p = counts[counts > 0] / n
        h_y = -(p * p.log()).sum()
        num = h_y - ce_sum / n + SHIFT
        rate = num / (ent_sum / n)
        if bool((num <= 0).any()):
            keep = torch.full_like(rate, 0.5)
        else:
            keep = torch.softmax(-rate / self.temperature, 0)
            keep = torch.where(keep.isnan(), torch.full_like(keep, 0.5), keep).clamp(*KEEP_RANGE)
        return keep, rate

    @torch.no_grad()
    def mask(self, grad: torch.Tensor, keep: float, generator: torch.Generator | None) -> None:
        """Zero the gradient of all but ``ceil(n keep)`` output units drawn by Fisher importance."""
        fisher = grad.float().pow(2).flatten(1).sum(1)
        n = fisher.numel()
        total = fisher.sum()
        nonzero = int((fisher > 0).sum())
        if nonzero == 0:
            return                      # nothing to update in this tensor anyway
        p = fisher / total
        # units with a zero gradient stay zero whatever their mask: draw among the others
        kept = torch.multinomial(p, min(math.ceil(n * keep), nonzero), replacement=False, generator=generator)
        mask = torch.zeros_like(p)
        mask[kept] = 1 / (p[kept] + 1 / n) if self.rescale else 1.0
        grad.mul_(mask.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1))))

    def after_backward(self, out, step):
        stats = super().after_backward(out, step)
        m = step.modalities
        keep, rate = self.significance(out, step)
        keeps = keep.tolist()
        if self.active(step.epoch):
            for u, k in zip(m.names, keeps):
                for p in m.modulated(u):
                    if p.grad is not None and p.dim() >= 2:
                        self.mask(p.grad, k, step.generator)
        return {**stats, **{f"amss_keep_{m.tags[u]}": k for u, k in zip(m.names, keeps)},
                **{f"amss_rate_{m.tags[u]}": r for u, r in zip(m.names, rate.tolist())}}


class AMSSPlus(AMSS):
    name = "amss-plus"
    rescale = True
