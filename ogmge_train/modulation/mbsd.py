"""``mbsd``: modality-balanced self-distillation, as BalanceBenchmark's MBSD trainer runs it for
two modalities (the model side's first and second: audio and visual for ours; no paper or
official code is named for it; the arithmetic is the benchmark's).

With ``z_u`` each modality's own logits (README: Training), ``p_u = softmax(z_u)``,
``q_u = p_u[y]``, per sample i of a batch of B:

- ``w_i = |q_a - q_v|`` when at least one modality predicts the label, else 0;
- ``RS_i = (1/C) sum_c (z_a - z_v)_ic^2`` (a squared distance of the logits);
- ``KL_i = pw_i * (log pw_i - ps_i)`` with ``ps = max(q_a, q_v)``, ``pw = min(q_a, q_v)`` (the
  benchmark's ``F.kl_div(ps, pw)``, which reads ``ps`` as a log-probability);

``L = CE(z) + CE(z_a) + CE(z_v) + (1/B) sum_i w_i (RS_i + KL_i)`` in the active epochs, with
gradients through every term (w, ps and pw included, as there), ``CE(z)`` outside them.
Every fusion. Step stats: ``mbsd_rs``, ``mbsd_kl`` (the two weighted means).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method, Step


def distillation_terms(z_a: torch.Tensor, z_v: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted means ``((1/B) sum w RS, (1/B) sum w KL)``."""
    z_a, z_v = z_a.float(), z_v.float()
    p_a, p_v = z_a.softmax(dim=1), z_v.softmax(dim=1)
    q_a = p_a.gather(1, labels.view(-1, 1)).squeeze(1)
    q_v = p_v.gather(1, labels.view(-1, 1)).squeeze(1)
    right = (p_a.argmax(dim=1) == labels) | (p_v.argmax(dim=1) == labels)
    ps, pw = torch.maximum(q_a, q_v), torch.minimum(q_a, q_v)
    w = torch.where(right, ps - pw, torch.zeros_like(ps))
    rs = (z_a - z_v).pow(2).sum(dim=1) / z_a.shape[1]
    kl = F.kl_div(ps, pw, reduction="none")
    n = len(labels)
    return (w * rs).sum() / n, (w * kl).sum() / n


class MBSD(Method):
    name = "mbsd"
    max_modalities = 2

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._terms: torch.Tensor | None = None

    def loss(self, out, step: Step) -> torch.Tensor:
        self._terms = None
        loss = F.cross_entropy(out.logits.float(), step.labels)
        if not self.active(step.epoch):
            return loss
        uni = [out.unimodal[u] for u in step.modalities.names]
        rs, kl = distillation_terms(uni[0], uni[1], step.labels)
        self._terms = torch.stack([rs, kl]).detach()
        return (loss + F.cross_entropy(uni[0].float(), step.labels) + F.cross_entropy(uni[1].float(), step.labels)
                + rs + kl)

    def after_backward(self, out, step):
        stats = super().after_backward(out, step)
        rs, kl = (0.0, 0.0) if self._terms is None else self._terms.tolist()
        return {**stats, "mbsd_rs": rs, "mbsd_kl": kl}
