"""``gradient-blending``: Gradient-Blending (Wang, Tran, Feiszli, CVPR 2020), the paper's Table 2
comparison.

The method adds a linear classifier per modality (``setup``: ``model.aux_heads``); the training
loss blends the outputs: ``L = w_f CE(fused) + sum_u w_u CE(aux_u)``. A fixed part of train
(``gb_holdout``, 8% by default, chosen by a hash of the sample key) is held out: the model never
trains on it. The weights are re-estimated before the first active epoch and then every
``gb_super_epoch`` epochs (10), from the overfitting-to-generalization ratio of each output:

- for each output m, a copy of the current model is trained for n epochs on the train part with
  ``CE(m)`` alone (the run's optimizer kind, lr and weight decay); n = ``gb_super_epoch``, capped
  by the epochs the run has left (the weights are used for at most that long, so the OGR is
  measured over the horizon it is used for; a 1-epoch trial trains copies for 1 epoch);
- before and after, the copy's mean loss is measured on the train part (``L_T``) and on the
  held-out part (``L_V``), in eval mode;
- ``G = L_V' - L_V``, ``O = (L_V' - L_T') - (L_V - L_T)``, ``w_m = |G / O^2|``, normalised to sum 1
  (the paper's OGR with deltas; a zero O counts as 1e-6).

Before the first estimate the weights are 1/(M+1) each; after ``--modulation-end`` the last ones
stay. Under DDP every rank trains its copies on its own part with gradients averaged over ranks
and the losses are summed over ranks, so every rank gets the same weights. Works with every
fusion and any number of modalities. The estimate reports progress (``method_progress`` events,
one unit per batch of the copies). Step stats: ``gb_f`` and ``gb_<tag>`` (the weights) besides
OGM's rho (k stays 1).
"""
from __future__ import annotations

import hashlib
import time

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..modalities import Modalities
from .base import EpochStart, Method, Step, keep_rows, linear_heads, progress_event

FUSED = "fused"
TASK = "OGR weight estimate"


def held_out(key: str, fraction: float) -> bool:
    """Whether sample ``key`` belongs to the held-out part (stable across runs and ranks)."""
    h = int.from_bytes(hashlib.sha256(b"gradient-blending/" + key.encode()).digest()[:8], "big")
    return h < fraction * 2**64


def output_logits(m: Modalities, out, which: str) -> torch.Tensor:
    """The fused logits, or modality ``which``'s head on its features (``m``: the model side whose
    heads to use, e.g. a copy's)."""
    if which == FUSED:
        return out.logits
    heads = m.aux
    assert isinstance(heads, torch.nn.ModuleDict), "gradient-blending: its heads were not set up (use a Balancer)"
    return heads[which](out.features[which])


def blend_weights(before: dict, after: dict) -> list[float]:
    """``w_m = |G / O^2|`` normalised; ``before``/``after``: output -> (L_T, L_V), in output order."""
    raw = []
    for m in before:
        (lt0, lv0), (lt1, lv1) = before[m], after[m]
        g = lv1 - lv0
        o = (lv1 - lt1) - (lv0 - lt0)
        raw.append(abs(g) / max(o * o, 1e-12))
    z = sum(raw)
    return [r / z for r in raw] if z > 0 else [1 / len(raw)] * len(raw)


class GradientBlending(Method):
    name = "gradient-blending"
    options = ("gb_super_epoch", "gb_holdout", "head_init")
    needs = ("forward", "num_classes", "dims")

    def __init__(self, *, gb_super_epoch: int = 10, gb_holdout: float = 0.08, head_init: str = "xavier", **kwargs):
        super().__init__(**kwargs)
        if gb_super_epoch < 1 or not 0.0 < gb_holdout < 1.0:
            raise ValueError("gb_super_epoch must be >= 1 and gb_holdout in (0, 1)")
        self.super_epoch, self.holdout, self.head_init = int(gb_super_epoch), float(gb_holdout), head_init
        self.weights = torch.full((3,), 1 / 3, dtype=torch.float64)
        self.outputs: tuple[str, ...] = (FUSED, "audio", "visual")

    def setup(self, modalities):
        self.outputs = (FUSED, *modalities.names)
        self.weights = torch.full((len(self.outputs),), 1 / len(self.outputs), dtype=torch.float64)
        self._tags = {FUSED: "f", **modalities.tags}
        return linear_heads(modalities, self.head_init)

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

    def copy_epochs(self, start: EpochStart) -> int:
        """Epochs each copy trains: ``gb_super_epoch``, capped by the epochs the run has left."""
        if start.epochs is None:
            return self.super_epoch
        return max(1, min(self.super_epoch, start.epochs - start.epoch))

    @torch.no_grad()
    def _losses(self, twin: Modalities, which: str, start: EpochStart, tick) -> tuple[float, float]:
        twin.model.eval()
        assert start.keyed_batches is not None
        sums: torch.Tensor | None = None
        for inputs, labels, keys in start.keyed_batches(start.epoch):
            held = self._held(keys).to(labels.device)
            ce = F.cross_entropy(output_logits(twin, twin.run(inputs), which).float(), labels,
                                 reduction="none").double()
            part = torch.stack([ce[~held].sum(), (~held).sum().double(), ce[held].sum(), held.sum().double()])
            sums = part if sums is None else sums + part
            tick()
        assert sums is not None, "gradient-blending: no training batches"
        sums = start.reduce(sums)
        if sums[3] == 0 or sums[1] == 0:
            raise ConfigError(f"gradient-blending: {int(sums[3])} held-out and {int(sums[1])} train samples; "
                              "both parts need samples (change --gb-holdout)")
        return (sums[0] / sums[1]).item(), (sums[2] / sums[3]).item()

    def _train_twin(self, twin: Modalities, which: str, start: EpochStart, world: float, epochs: int, tick) -> None:
        assert start.keyed_batches is not None and start.make_optimizer is not None
        opt = start.make_optimizer(list(twin.model.parameters()))
        for k in range(epochs):
            twin.model.train()
            for inputs, labels, keys in start.keyed_batches(start.epoch + k):
                rows, weight = keep_rows(self.train_rows(keys))
                rows = rows.to(labels.device)
                out = twin.run({u: x[rows] for u, x in inputs.items()})
                loss = weight * F.cross_entropy(output_logits(twin, out, which).float(), labels[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if start.all_reduce is not None:      # the copies stay identical on every rank
                    grads = [p.grad for p in twin.model.parameters() if p.grad is not None]
                    flat = start.reduce(torch.cat([g.flatten() for g in grads])) / world
                    for g, f in zip(grads, flat.split([g.numel() for g in grads])):
                        g.copy_(f.view_as(g))
                opt.step()
                tick()

    def begin_epoch(self, start: EpochStart) -> None:
        m = start.modalities
        if not self.due(start.epoch):
            return
        if start.keyed_batches is None or start.make_optimizer is None or start.steps is None:
            raise ConfigError("gradient-blending trains copies of the model before an estimate: call "
                              "begin_epoch(epoch, steps=..., keyed_batches=..., make_optimizer=...)")
        model = m.model
        world = start.reduce(torch.ones(1, device=next(model.parameters()).device)).item()
        was_training = model.training
        epochs = self.copy_epochs(start)
        total, done, t0 = len(self.outputs) * (epochs + 2) * start.steps, 0, time.monotonic()

        def tick():
            nonlocal done
            done += 1
            start.emit(progress_event(self.name, TASK, done, total, t0, time.monotonic()))

        start.emit(progress_event(self.name, TASK, 0, total, t0, t0))
        before, after = {}, {}
        for which in self.outputs:
            twin = m.copy()
            before[which] = self._losses(twin, which, start, tick)
            self._train_twin(twin, which, start, world, epochs, tick)
            after[which] = self._losses(twin, which, start, tick)
            del twin
        model.train(was_training)
        self.weights = torch.tensor(blend_weights(before, after), dtype=torch.float64)

    # -- training

    def loss(self, out, step: Step) -> torch.Tensor:
        m = step.modalities
        w = self.weights.to(out.logits.device).float()
        terms = [w[i] * F.cross_entropy(output_logits(m, out, o).float(), step.labels)
                 for i, o in enumerate(self.outputs)]
        loss = terms[0]
        for term in terms[1:]:
            loss = loss + term
        return loss

    def after_backward(self, out, step: Step):
        stats = super().after_backward(out, step)
        return {**stats, **{f"gb_{self._tags[o]}": w for o, w in zip(self.outputs, self.weights.tolist())}}

    def state_dict(self) -> dict:
        return {"weights": self.weights.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.weights = state["weights"].double()
