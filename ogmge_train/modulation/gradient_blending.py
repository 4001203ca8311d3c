"""``gradient-blending``: Gradient-Blending (Wang, Tran, Feiszli, CVPR 2020), the paper's Table 2
comparison.

The model carries a linear classifier per modality (``aux_heads``); the training loss blends the
three outputs: ``L = w_f CE(fused) + w_a CE(aux_a) + w_v CE(aux_v)``. A fixed part of train
(``gb_holdout``, 8% by default, chosen by a hash of the sample key) is held out: the model never
trains on it. The weights are re-estimated before the first active epoch and then every
``gb_super_epoch`` epochs (10), from the overfitting-to-generalization ratio of each output:

- for each output m, a copy of the current model is trained for ``gb_super_epoch`` epochs on the
  train part with ``CE(m)`` alone (the run's optimizer kind, lr and weight decay);
- before and after, the copy's mean loss is measured on the train part (``L_T``) and on the
  held-out part (``L_V``), in eval mode;
- ``G = L_V' - L_V``, ``O = (L_V' - L_T') - (L_V - L_T)``, ``w_m = |G / O^2|``, normalised to sum 1
  (the paper's OGR with deltas; a zero O counts as 1e-6).

Before the first estimate the weights are 1/3 each; after ``--modulation-end`` the last ones stay.
Under DDP every rank trains its copies on its own part with gradients averaged over ranks and the
losses are summed over ranks, so every rank gets the same weights. Works with every fusion.
Step stats: ``gb_f``, ``gb_a``, ``gb_v`` (the weights) besides OGM's rho (k stays 1).
"""
from __future__ import annotations

import copy
import hashlib

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import EpochStart, Method, Step

OUTPUTS = ("fused", "audio", "visual")


def held_out(key: str, fraction: float) -> bool:
    """Whether sample ``key`` belongs to the held-out part (stable across runs and ranks)."""
    h = int.from_bytes(hashlib.sha256(b"gradient-blending/" + key.encode()).digest()[:8], "big")
    return h < fraction * 2**64


def keep_rows(rows: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``rows`` and loss weight 1, or, for a batch without training samples, its first sample with
    weight 0 (every rank must still run the step: DDP and the gradient all-reduce expect it)."""
    if bool(rows.any()):
        return rows, 1.0
    rows = rows.clone()
    rows[0] = True
    return rows, 0.0


def output_logits(out, which: str) -> torch.Tensor:
    return {"fused": out.logits, "audio": out.aux_a, "visual": out.aux_v}[which]


def blend_weights(before: dict, after: dict) -> list[float]:
    """``w_m = |G / O^2|`` normalised; ``before``/``after``: output -> (L_T, L_V)."""
    raw = []
    for m in OUTPUTS:
        (lt0, lv0), (lt1, lv1) = before[m], after[m]
        g = lv1 - lv0
        o = (lv1 - lt1) - (lv0 - lt0)
        raw.append(abs(g) / max(o * o, 1e-12))
    z = sum(raw)
    return [r / z for r in raw] if z > 0 else [1 / 3] * 3


class GradientBlending(Method):
    name = "gradient-blending"
    options = ("gb_super_epoch", "gb_holdout")

    def __init__(self, *, gb_super_epoch: int = 10, gb_holdout: float = 0.08, **kwargs):
        super().__init__(**kwargs)
        if gb_super_epoch < 1 or not 0.0 < gb_holdout < 1.0:
            raise ValueError("gb_super_epoch must be >= 1 and gb_holdout in (0, 1)")
        self.super_epoch, self.holdout = int(gb_super_epoch), float(gb_holdout)
        self.weights = torch.full((3,), 1 / 3, dtype=torch.float64)

    # -- the held-out part

    def _held(self, keys) -> torch.Tensor:
        return torch.tensor([held_out(k, self.holdout) for k in keys], dtype=torch.bool)

    def train_rows(self, keys):
        """The training samples of a batch; may be all False (the loop then keeps one sample with
        zero loss weight, so every DDP rank still steps)."""
        return ~self._held(keys)

    # -- estimation

    def due(self, epoch: int) -> bool:
        return self.active(epoch) and (epoch - self.start_epoch) % self.super_epoch == 0

    @torch.no_grad()
    def _losses(self, twin, which: str, start: EpochStart) -> tuple[float, float]:
        twin.eval()
        assert start.keyed_batches is not None, "gradient-blending needs keyed training batches"
        sums: torch.Tensor | None = None
        for audio, visual, labels, keys in start.keyed_batches(start.epoch):
            held = self._held(keys).to(labels.device)
            ce = F.cross_entropy(output_logits(twin(audio, visual), which).float(), labels, reduction="none").double()
            part = torch.stack([ce[~held].sum(), (~held).sum().double(), ce[held].sum(), held.sum().double()])
            sums = part if sums is None else sums + part
        assert sums is not None, "gradient-blending: no training batches"
        sums = start.reduce(sums)
        if sums[3] == 0 or sums[1] == 0:
            raise ConfigError(f"gradient-blending: {int(sums[3])} held-out and {int(sums[1])} train samples; "
                              "both parts need samples (change --gb-holdout)")
        return (sums[0] / sums[1]).item(), (sums[2] / sums[3]).item()

    def _train_twin(self, twin, which: str, start: EpochStart, world: float) -> None:
        assert start.keyed_batches is not None and start.make_optimizer is not None, \
            "gradient-blending needs keyed training batches and an optimizer factory"
        opt = start.make_optimizer(list(twin.parameters()))
        for k in range(self.super_epoch):
            twin.train()
            for audio, visual, labels, keys in start.keyed_batches(start.epoch + k):
                rows, weight = keep_rows(self.train_rows(keys))
                rows = rows.to(labels.device)
                out = twin(audio[rows], visual[rows])
                loss = weight * F.cross_entropy(output_logits(out, which).float(), labels[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if start.all_reduce is not None:      # the copies stay identical on every rank
                    grads = [p.grad for p in twin.parameters() if p.grad is not None]
                    flat = start.reduce(torch.cat([g.flatten() for g in grads])) / world
                    for g, f in zip(grads, flat.split([g.numel() for g in grads])):
                        g.copy_(f.view_as(g))
                opt.step()

    def begin_epoch(self, start: EpochStart) -> None:
        model = start.model
        if getattr(model, "aux_heads", None) is None or not self.due(start.epoch):
            return
        world = start.reduce(torch.ones(1, device=next(model.parameters()).device)).item()
        was_training = model.training
        before, after = {}, {}
        for which in OUTPUTS:
            twin = copy.deepcopy(model)
            before[which] = self._losses(twin, which, start)
            self._train_twin(twin, which, start, world)
            after[which] = self._losses(twin, which, start)
            del twin
        model.train(was_training)
        self.weights = torch.tensor(blend_weights(before, after), dtype=torch.float64)

    # -- training

    def loss(self, out, step: Step) -> torch.Tensor:
        if out.aux_a is None or out.aux_v is None:
            return F.cross_entropy(out.logits.float(), step.labels)
        w = self.weights.to(out.logits.device).float()
        terms = [w[i] * F.cross_entropy(output_logits(out, m).float(), step.labels) for i, m in enumerate(OUTPUTS)]
        loss = terms[0]
        for term in terms[1:]:
            loss = loss + term
        return loss

    def after_backward(self, model, out, labels, *, epoch: int, all_reduce=None, generator=None):
        stats = super().after_backward(model, out, labels, epoch=epoch, all_reduce=all_reduce, generator=generator)
        gb_f, gb_a, gb_v = self.weights.tolist()
        return {**stats, "gb_f": gb_f, "gb_a": gb_a, "gb_v": gb_v}

    def state_dict(self) -> dict:
        return {"weights": self.weights.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.weights = state["weights"].double()
