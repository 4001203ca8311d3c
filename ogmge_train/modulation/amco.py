"""``amco``: Adaptive Mask Co-optimization (Zhou et al., ICASSP 2023), as BalanceBenchmark's AMCo
trainer and model run it (the paper is not openly available; README: Where we differ).

The method adds one ``Linear(C, C)`` after fusion (``setup``: ``model.aux_heads``, PyTorch's
default init as the benchmark). With ``z_u`` each modality's unimodal logits (B, C), which must
sum to the fused logits (concat: ``W_u u + b/2``; sum: each branch), per step of an active epoch e:

- mask ratio ``p = sin(pi/2 * min(eps, l) / eps)`` with ``l`` reset to 0 at the start of every
  epoch and advanced by ``e / 10`` after every step (so epoch 0 never masks and, with eps 0.3,
  from the 4th step of epoch 1 on ``p = 1``);
- a class mask ``m`` with ``floor(p C)`` zeros at random positions (one mask for the whole batch,
  drawn from the step's generator, the same on every rank);
- ``z'_u = m * z_u`` for every *dependent* modality, ``z'_u = z_u`` otherwise; the loss is
  ``CE(star(sum_u z'_u)) + sum_u CE(z'_u)`` (co-optimization);
- after the step, modality u is dependent for the next step when its mean softmax share over the
  concatenated ``[z'_1 .. z'_M]`` (M C entries) exceeds ``sigma`` (0.5); every modality starts an
  epoch independent. Under DDP the shares are summed over ranks.

Outside the active epochs the loss is ``CE(star(sum_u z_u))`` alone. Evaluation: ``star`` of the
fused logits (``fuse``), unmasked. Works with the additive fusions (concat, sum) and any number of
modalities. Step stats: ``amco_p`` and ``amco_dep_<tag>`` (1 when that modality was masked) besides
OGM's rho (k stays 1). State: ``l`` and the dependent flags (what a mid-epoch checkpoint needs).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..names import METHOD_FUSIONS
from .base import EpochStart, Method, Step

RAMP = 0.1      # l advances by epoch * RAMP per step (the benchmark's l_t += current_epoch / 10)


def mask_ratio(level: float, eps: float) -> float:
    """``p = sin(pi/2 * min(eps, l) / eps)``."""
    return math.sin(math.pi / 2 * (min(eps, level) / eps))


def class_mask(num_classes: int, ratio: float, generator: torch.Generator | None, device) -> torch.Tensor:
    """(C,) float: ``floor(ratio * C)`` zeros at positions of a random permutation, ones elsewhere."""
    zeros = int(ratio * num_classes)
    order = torch.randperm(num_classes, generator=generator, device=generator.device if generator else device)
    mask = torch.ones(num_classes, device=order.device)
    mask[order[:zeros]] = 0.0
    return mask.to(device)


class AMCo(Method):
    name = "amco"
    fusions = METHOD_FUSIONS["amco"]
    options = ("amco_sigma", "amco_eps")

    def __init__(self, *, amco_sigma: float = 0.5, amco_eps: float = 0.3, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= amco_sigma <= 1.0 or amco_eps <= 0:
            raise ValueError("amco_sigma must be in [0, 1] and amco_eps > 0")
        self.sigma, self.eps = float(amco_sigma), float(amco_eps)
        self.level = 0.0
        self.dependent: dict[str, bool] = {}
        self._masked: dict | None = None      # this step: (mask, p, masked logits)
        self._checked = False

    def setup(self, modalities):
        if modalities.num_classes is None:
            raise ValueError("amco adds a Linear(C, C) after fusion: give Modalities(..., num_classes=...)")
        self._tags = dict(modalities.tags)
        self.dependent = dict.fromkeys(modalities.names, False)
        c = modalities.num_classes
        return nn.Linear(c, c)

    def begin_epoch(self, start: EpochStart) -> None:
        self.level = 0.0
        self.dependent = dict.fromkeys(start.modalities.names, False)

    def _star(self, m, logits: torch.Tensor) -> torch.Tensor:
        star = m.aux
        assert isinstance(star, nn.Linear), "amco: its layer was not set up (build it with a Balancer)"
        return star(logits)

    def loss(self, out, step: Step) -> torch.Tensor:
        m, labels = step.modalities, step.labels
        self._masked = None
        if not self._checked:
            total = sum(out.unimodal[u].detach().float() for u in m.names)
            if not torch.allclose(total, out.logits.detach().float(), rtol=1e-3, atol=1e-4):
                raise ConfigError("amco needs unimodal logits that sum to the fused logits (an additive head: "
                                  "--fusion concat or sum)")
            self._checked = True
        if not self.active(step.epoch):
            return F.cross_entropy(self._star(m, out.logits).float(), labels)
        p = mask_ratio(self.level, self.eps)
        mask = class_mask(out.logits.shape[1], p, step.generator, out.logits.device).to(out.logits.dtype)
        masked = {u: out.unimodal[u] * mask if self.dependent.get(u, False) else out.unimodal[u] for u in m.names}
        fused = masked[m.names[0]]
        for u in m.names[1:]:
            fused = fused + masked[u]
        loss = F.cross_entropy(self._star(m, fused).float(), labels)
        for u in m.names:
            loss = loss + F.cross_entropy(masked[u].float(), labels)
        self._masked = {"p": p, "logits": {u: z.detach() for u, z in masked.items()},
                        "dep": [float(self.dependent.get(u, False)) for u in m.names]}
        return loss

    @torch.no_grad()
    def after_backward(self, out, step: Step):
        stats = super().after_backward(out, step)
        m = step.modalities
        tags = [m.tags[u] for u in m.names]
        done, self._masked = self._masked, None
        if done is None:
            return {**stats, "amco_p": 0.0, **{f"amco_dep_{t}": 0.0 for t in tags}}
        probs = torch.cat([done["logits"][u].float() for u in m.names], dim=1).softmax(dim=1).double()
        c = probs.shape[1] // len(m.names)
        shares = torch.stack([probs[:, i * c:(i + 1) * c].sum() for i in range(len(m.names))])
        total = step.reduce(torch.cat([shares, shares.new_tensor([float(probs.shape[0])])]))
        mean_share = (total[:-1] / total[-1]).tolist()
        self.dependent = {u: s > self.sigma for u, s in zip(m.names, mean_share)}
        self.level += step.epoch * RAMP
        return {**stats, "amco_p": done["p"], **{f"amco_dep_{t}": d for t, d in zip(tags, done["dep"])}}

    def fuse(self, out, modalities) -> torch.Tensor:
        return self._star(modalities, out.logits)

    def state_dict(self) -> dict:
        return {"level": self.level, "dependent": [bool(self.dependent.get(u, False)) for u in self._tags]}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.level = float(state["level"])
            self.dependent = dict(zip(self._tags, (bool(d) for d in state["dependent"])))
