"""``greedy``: balanced multimodal learning against greedy learning (Wu, Jastrzebski, Cho, Geras,
ICML 2022), as its official code (``nyukat/greedy_multimodal_learning``: ``MMTM_mitigate``,
``Bias_Mitigation_Strong``, ``blend_loss``) runs it on our encoders.

Model: the method inserts an MMTM block (multimodal transfer module) after every encoder stage but
the first (ResNet-18: after layer2, layer3, layer4, as the official model); the encoders then run
stage by stage (``Modalities(stages=...)``, ``Method.transform_stage``). At a block, with ``x_u``
modality u's maps (B, C_u, ...):

- ``s_u = mean of x_u over everything but (B, C_u)``; ``e = relu(W_s [s_1; s_2] + b_s)`` (width
  ``int(2 (C_1 + C_2) / 4)``); ``c_u = sigmoid(W_u e + b_u)``; ``x_u <- x_u * c_u`` (broadcast);
- ``a_u``, the running average of the batch mean of ``c_u`` over all training steps so far
  (buffers of the block, saved with the model; under DDP the mean over the global batch).

In a *re-balancing* (curation) step for modality u, ``c_u`` is replaced by ``a_u`` (this batch
included): u's features no longer depend on the other modality's, so u must learn on its own.
Loss in every epoch: ``sum_u CE(z_u)`` with ``z_u`` the unimodal logits (the official
``blend_loss`` over its two branch classifiers; our ``sum`` head has exactly those branches);
prediction: the fused ``z_1 + z_2`` (the official mean, same arg-max).

Conditional learning speeds, after each backward (before the optimizer step): per modality,
``M_main_u += sum ||g||^2 / sum ||w||^2`` over u's encoder parameters and ``M_bypass_u += ...``
over u's excitation layers plus the shared squeeze layers of all blocks (sums over all steps
since the start of training), ``d = log10(M_bypass_1 / M_main_1) - log10(M_bypass_2 / M_main_2)``.
Rule (the official callback): before ``--modulation-start`` d is measured and nothing curated;
from then on, outside a re-balancing window d is measured and if ``|d| > --greedy-eps`` (0.01)
a window of ``--greedy-window`` (5) steps starts, re-balancing the first modality if ``d > 0``,
else the second; no speed is measured inside a window.

Two modalities, ``sum`` fusion only. Step stats: ``greedy_d`` (the last d), ``greedy_cur_<tag>``
(1 when this step's forward re-balanced that modality). State: the speed sums and the window.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..names import METHOD_FUSIONS
from .base import Method, Step

RATIO = 4


class MMTM(nn.Module):
    """One multimodal transfer module over modalities of ``dims`` channels (order = modalities')."""

    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        width = int(2 * sum(dims) / RATIO)
        self.squeeze = nn.Linear(sum(dims), width)
        self.excite = nn.ModuleList([nn.Linear(width, d) for d in dims])
        for i, d in enumerate(dims):
            self.register_buffer(f"avg{i}", torch.zeros(d))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def average(self, i: int) -> torch.Tensor:
        return self.get_buffer(f"avg{i}")

    @property
    def steps(self) -> torch.Tensor:
        """Training steps averaged so far (the ``count`` buffer)."""
        return self.get_buffer("count")

    def scales(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        squeezed = torch.cat([x.flatten(2).mean(dim=2) for x in maps], dim=1)
        e = torch.relu(self.squeeze(squeezed))
        return [torch.sigmoid(fc(e)) for fc in self.excite]


class Greedy(Method):
    name = "greedy"
    fusions = METHOD_FUSIONS["greedy"]
    options = ("greedy_eps", "greedy_window")
    needs = ("stages",)
    max_modalities = 2
    accumulation = False      # the speeds are those of one backward

    def __init__(self, *, greedy_eps: float = 0.01, greedy_window: int = 5, **kwargs):
        super().__init__(**kwargs)
        if greedy_eps < 0 or greedy_window < 1:
            raise ValueError("greedy_eps must be >= 0 and greedy_window >= 1")
        self.eps, self.window = float(greedy_eps), int(greedy_window)
        self.speeds = torch.zeros(4, dtype=torch.float64)    # M_bypass_1, M_bypass_2, M_main_1, M_main_2
        self.curating: int | None = None                     # index of the modality re-balanced next
        self.window_step = 0
        self.last_d = 0.0
        self._pending: list[tuple[MMTM, int, torch.Tensor, int]] = []
        self._side = None
        self._used: int | None = None

    def setup(self, modalities):
        assert modalities.stages is not None
        widths = [modalities.stages[u] for u in modalities.names]
        if len({len(w) for w in widths}) != 1 or len(widths[0]) < 2:
            raise ValueError("greedy needs encoders with the same number (>= 2) of stages")
        self._side = modalities       # evaluation forwards have no step: its blocks through this
        return nn.ModuleDict({str(i): MMTM(tuple(w[i] for w in widths)) for i in range(1, len(widths[0]))})

    def _blocks(self, m) -> dict[str, MMTM]:
        blocks = m.aux
        assert isinstance(blocks, nn.ModuleDict), "greedy: its MMTM blocks were not set up (build it with a Balancer)"
        return {k: b for k, b in blocks.items() if isinstance(b, MMTM)}

    def transform_stage(self, i, maps, *, training, step=None):
        if step is None and training:
            raise RuntimeError("greedy: a training forward needs its step")
        blocks = self._blocks(step.modalities if step is not None else self._side)
        if str(i) not in blocks:
            return maps
        block = blocks[str(i)]
        names = list(maps)
        xs = [maps[u] for u in names]
        scales = block.scales(xs)
        out = {}
        for j, (u, x, c) in enumerate(zip(names, xs, scales)):
            if training:
                total = c.detach().float().sum(dim=0)
                self._pending.append((block, j, total, c.shape[0]))
                if self.curating == j:       # the average with this batch, as the official forward
                    n = block.steps.double()
                    avg = ((total / c.shape[0]).double() + block.average(j).double() * n) / (n + 1)
                    c = avg.to(c.dtype).expand_as(c) + 0 * c      # 0 * c: every parameter keeps a gradient (DDP)
            out[u] = x * c.view(*c.shape, *([1] * (x.dim() - 2)))
        if training:
            self._used = self.curating
        return out

    def loss(self, out, step: Step) -> torch.Tensor:
        m = step.modalities
        loss = F.cross_entropy(out.unimodal[m.names[0]].float(), step.labels)
        for u in m.names[1:]:
            loss = loss + F.cross_entropy(out.unimodal[u].float(), step.labels)
        return loss

    @torch.no_grad()
    def _commit_averages(self, step: Step) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        sums = step.reduce(torch.cat([*(t for _, _, t, _ in pending),
                                      pending[0][2].new_tensor([float(pending[0][3])])]))
        n = sums[-1]
        parts = sums[:-1].split([t.numel() for _, _, t, _ in pending])
        for (block, j, _, _), part in zip(pending, parts):
            k = block.steps.to(part.dtype)
            avg = block.average(j)
            avg.copy_(((part / n) + avg.to(part.dtype) * k) / (k + 1))
        for block in {id(b): b for b, _, _, _ in pending}.values():
            block.steps.add_(1)

    @torch.no_grad()
    def _speed(self, step: Step) -> float:
        m = step.modalities
        blocks = self._blocks(m)
        shared = [p for b in blocks.values() for p in b.squeeze.parameters()]
        groups = [[p for b in blocks.values() for p in b.excite[j].parameters()] + shared for j in range(2)]
        groups += [m.params(u) for u in m.names]

        def ratio(params):
            gn = sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None)
            wn = sum((p.double() ** 2).sum() for p in params)
            return gn / wn
        self.speeds += torch.stack([ratio(g) for g in groups]).cpu()
        b0, b1, m0, m1 = self.speeds.tolist()
        return math.log10(b0 / m0) - math.log10(b1 / m1)

    def after_backward(self, out, step: Step):
        stats = super().after_backward(out, step)
        m = step.modalities
        used, self._used = self._used, None
        self._commit_averages(step)
        if not self.active(step.epoch):
            self.last_d, self.curating = self._speed(step), None
        elif self.curating is None:
            d = self.last_d = self._speed(step)
            if abs(d) > self.eps:
                self.curating, self.window_step = (0 if d > 0 else 1), 0
        else:
            self.window_step += 1
            if self.window_step == self.window:
                self.curating = None
        return {**stats, "greedy_d": self.last_d,
                **{f"greedy_cur_{m.tags[u]}": float(used == j) for j, u in enumerate(m.names)}}

    def state_dict(self) -> dict:
        return {"speeds": self.speeds.clone(), "curating": -1 if self.curating is None else self.curating,
                "window_step": self.window_step, "last_d": self.last_d}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.speeds = state["speeds"].double().clone()
            self.curating = None if int(state["curating"]) < 0 else int(state["curating"])
            self.window_step, self.last_d = int(state["window_step"]), float(state["last_d"])
