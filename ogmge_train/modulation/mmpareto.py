"""``mmpareto``: MMPareto (Wei & Hu, ICML 2024), as its official code.

The model carries one extra linear classifier per modality (``aux_heads``); the loss is
``L = CE(fused) + CE(aux_a) + CE(aux_v)``. For each encoder u (all its parameters), before the
backward of L, the gradients of the multimodal loss ``g_m = dCE(fused)/d theta_u`` and of the
unimodal loss ``g_u = dCE(aux_u)/d theta_u`` are taken separately (all-reduced under DDP). Then:

- ``cos = cosine(g_m, g_u)`` over the whole encoder (all tensors flattened together);
- weights ``(w_m, w_u) = (1/2, 1/2)`` if ``cos > 0``, else the min-norm point of the segment:
  ``w_m = (g_u.g_u - g_m.g_u) / (g_m.g_m + g_u.g_u - 2 g_m.g_u)``, ``w_u = 1 - w_m`` (for
  ``cos <= 0`` the solver's clipped cases cannot occur);
- per parameter tensor: ``new = 2 w_m g_m + 2 w_u g_u``; ``r = ||g|| / ||new||`` with g the
  gradient of L; the gradient becomes ``gamma * max(r, 1) * new`` (``gamma`` = 1.5).

Heads (fusion and auxiliary) keep the gradient of L. Active epochs: outside them L is still
back-propagated, without the surgery. Works with every fusion (the unimodal losses use the
auxiliary heads). Step stats: ``cos_a``/``cos_v`` and ``w_a``/``w_v`` (the weight ``w_m`` of the
multimodal gradient) besides OGM's rho (k stays 1).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F

from .base import Method, Step

if TYPE_CHECKING:
    from ..models import AVModel

GAMMA = 1.5


def pareto_weights(g_m: torch.Tensor, g_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, w_m)`` for flat gradients (float64, on the device)."""
    g_m, g_u = g_m.double(), g_u.double()
    mm, mu, uu = g_m @ g_m, g_m @ g_u, g_u @ g_u
    cos = mu / (mm.sqrt() * uu.sqrt()).clamp(min=1e-12)
    w_min_norm = (uu - mu) / (mm + uu - 2 * mu).clamp(min=1e-30)
    return cos, torch.where(cos > 0, torch.full_like(cos, 0.5), w_min_norm)


class MMPareto(Method):
    name = "mmpareto"
    gamma = GAMMA

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._pending = None

    def loss(self, out, step: Step) -> torch.Tensor:
        labels = step.labels
        self._pending = None
        l_m = F.cross_entropy(out.logits.float(), labels)
        if out.aux_a is None or out.aux_v is None:
            return l_m
        l_a, l_v = F.cross_entropy(out.aux_a.float(), labels), F.cross_entropy(out.aux_v.float(), labels)
        if self.active(step.epoch):
            model = cast("AVModel", step.model)     # the unwrapped AVModel (see Step)
            groups = [[p for _, p in model.modulated_parameters(m, "all")] for m in ("audio", "visual")]
            flat = []
            for params, l_u in zip(groups, (l_a, l_v)):
                for loss in (l_m, l_u):
                    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                    flat += [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            # under DDP: the mean over ranks, like the gradient DDP produces for L
            sizes = [g.numel() for g in flat]
            vec = torch.cat([*(g.flatten() for g in flat), flat[0].new_ones(1)])
            vec = step.reduce(vec)
            vec = vec[:-1] / vec[-1]
            parts = list(vec.split(sizes))
            n_a = len(groups[0])
            shaped = [v.view_as(g) for v, g in zip(parts, flat)]
            self._pending = [(groups[0], shaped[:n_a], shaped[n_a:2 * n_a]),
                             (groups[1], shaped[2 * n_a:2 * n_a + len(groups[1])], shaped[2 * n_a + len(groups[1]):])]
        return l_m + l_a + l_v

    @torch.no_grad()
    def after_backward(self, model, out, labels, *, epoch: int, all_reduce=None, generator=None):
        stats = super().after_backward(model, out, labels, epoch=epoch, all_reduce=all_reduce, generator=generator)
        pending, self._pending = self._pending, None
        if pending is None:
            return {**stats, "cos_a": 0.0, "cos_v": 0.0, "w_a": 0.5, "w_v": 0.5}
        summary = []
        for params, g_m, g_u in pending:
            cos, w = pareto_weights(torch.cat([g.flatten() for g in g_m]), torch.cat([g.flatten() for g in g_u]))
            w_m, w_u = w.float(), (1 - w).float()
            for p, gm, gu in zip(params, g_m, g_u):
                if p.grad is None:
                    continue
                new = 2 * w_m * gm + 2 * w_u * gu
                norm = new.norm()
                ratio = torch.where(norm > 0, p.grad.norm() / norm.clamp(min=1e-30), torch.ones_like(norm))
                p.grad.copy_(self.gamma * torch.clamp(ratio, min=1.0) * new)
            summary += [cos, w]
        cos_a, w_a, cos_v, w_v = torch.stack(summary).tolist()
        return {**stats, "cos_a": cos_a, "cos_v": cos_v, "w_a": w_a, "w_v": w_v}
