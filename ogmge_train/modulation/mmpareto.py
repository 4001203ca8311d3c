"""``mmpareto``: MMPareto (Wei & Hu, ICML 2024), as its official code.

The method adds one linear classifier per modality (``setup``: ``model.aux_heads``); the loss is
``L = CE(fused) + sum_u CE(aux_u)``. For each encoder u (all its parameters), before the
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
auxiliary heads) and any number of modalities (one pair of gradients per encoder). Step stats:
``cos_<tag>`` and ``w_<tag>`` (the weight ``w_m`` of the multimodal gradient) besides OGM's rho
(k stays 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method, Step, linear_heads

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
    options = ("head_init",)
    needs = ("num_classes", "dims")
    accumulation = False     # the per-loss gradients are those of one batch

    def __init__(self, *, head_init: str = "xavier", **kwargs):
        super().__init__(**kwargs)
        self.head_init = head_init
        self._pending: list[tuple[list, list, list]] | None = None

    def setup(self, modalities):
        return linear_heads(modalities, self.head_init)

    def loss(self, out, step: Step) -> torch.Tensor:
        m, labels = step.modalities, step.labels
        self._pending = None
        l_m = F.cross_entropy(out.logits.float(), labels)
        heads = m.aux
        assert isinstance(heads, torch.nn.ModuleDict), "mmpareto: its heads were not set up (build it with a Balancer)"
        l_u = [F.cross_entropy(heads[u](out.features[u]).float(), labels) for u in m.names]
        if self.active(step.epoch):
            groups = [m.params(u) for u in m.names]
            flat = []
            for params, loss_u in zip(groups, l_u):
                for loss in (l_m, loss_u):
                    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                    flat += [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            # under DDP: the mean over ranks, like the gradient DDP produces for L
            sizes = [g.numel() for g in flat]
            vec = torch.cat([*(g.flatten() for g in flat), flat[0].new_ones(1)])
            vec = step.reduce(vec)
            vec = vec[:-1] / vec[-1]
            shaped = [v.view_as(g) for v, g in zip(vec.split(sizes), flat)]
            pending, i = [], 0
            for params in groups:
                n = len(params)
                pending.append((params, shaped[i:i + n], shaped[i + n:i + 2 * n]))
                i += 2 * n
            self._pending = pending
        loss = l_m
        for term in l_u:
            loss = loss + term
        return loss

    @torch.no_grad()
    def after_backward(self, out, step: Step):
        stats = super().after_backward(out, step)
        tags = [step.modalities.tags[u] for u in step.modalities.names]
        pending, self._pending = self._pending, None
        if pending is None:
            return {**stats, **{f"cos_{t}": 0.0 for t in tags}, **{f"w_{t}": 0.5 for t in tags}}
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
        values = torch.stack(summary).tolist()
        return {**stats, **{f"cos_{t}": values[2 * i] for i, t in enumerate(tags)},
                **{f"w_{t}": values[2 * i + 1] for i, t in enumerate(tags)}}
