"""``valuation-sample`` / ``valuation-modality``: Enhancing Multimodal Cooperation via Sample-level
Modality Valuation (Wei, Feng, Wang, Hu, CVPR 2024), as its official code
(``code/sample_level.py``, ``code/modality_level.py`` and their datasets).

Valuation, before every active epoch (the model after the previous epoch, in eval mode, no
gradient), on this rank's training samples of the epoch's order (``keyed_batches``): for each
sample and coalition S of the two modalities, the fused prediction with the pooled features of
the modalities outside S zeroed (the official ``exec_drop``), value ``v(S) = |S| * 1[correct]``
(``v({}) = 0``), and each modality's Shapley value
``phi_u = sum_{S not containing u} |S|! (M - |S| - 1)! / M! (v(S + u) - v(S))``
(two modalities: ``phi_a = (v(a) + v(av) - v(v)) / 2``, values in {-0.5, 0, 0.5, 1, 1.5}).

The epoch then trains every sample once plus copies, each copy keeping one modality u (the
other's features zeroed before fusion):

- ``valuation-sample``: per sample and modality, ``c(phi_u)`` copies keeping u: 1 for
  0.4 < phi < 1, 2 for -0.1 < phi < 0.4, 3 for phi < -0.1, none otherwise (the official thresholds);
- ``valuation-modality``: phī_u, the mean of phi_u over ``floor(valuation_part_ratio * n)``
  samples drawn with replacement (0.2, official), ``gap_u = 1 - phī_u``,
  ``d = 2/3 |gap_a - gap_v|``; ``int(d n)`` samples drawn with replacement get a copy keeping the
  modality with the larger gap (visual on a tie, as there). Under DDP each rank draws among its
  own samples (generators seeded by (seed, epoch, rank)) and the means are over all ranks.

The copies of a sample join the step of its batch: the batch's rows and their copies, shuffled
(``step.local_generator``), make ``K = round(rows / batch)`` (at least 1) optimizer steps of about a
batch each (K from the sums over ranks, the same on every rank), loss CE of the fused logits. The
official code instead shuffles the enlarged training set as a whole (copies meet other batches'
samples) and makes ``total rows / batch`` updates; here each batch rounds its own share.
Every fusion; two modalities. Step stats: ``phi_<tag>`` (the epoch's mean Shapley values over all
ranks), ``copies`` (this rank's copies in the step), ``valuation_d`` (modality level). Before
``--modulation-start`` (the official warm-up is 5 epochs) a step is plain training.
"""
from __future__ import annotations

import dataclasses
import math
import time
from itertools import combinations

import torch
import torch.nn.functional as F

from ..modalities import Output
from .base import EpochStart, Method, Step, StepResult, StepRun, progress_event, step_generator


def shapley(correct: dict[tuple[str, ...], torch.Tensor], names: tuple[str, ...]) -> torch.Tensor:
    """(N, M) float64 per-sample Shapley values from each non-empty coalition's correctness
    (bool (N,)), with value ``|S| * correct`` and ``v({}) = 0``."""
    m = len(names)
    empty = torch.zeros_like(next(iter(correct.values())), dtype=torch.float64)

    def v(kept) -> torch.Tensor:
        key = tuple(u for u in names if u in kept)
        return len(key) * correct[key].double() if key else empty

    cols = []
    for u in names:
        others = [w for w in names if w != u]
        terms = [math.factorial(len(s)) * math.factorial(m - len(s) - 1) / math.factorial(m) * (v({*s, u}) - v(set(s)))
                 for r in range(m) for s in combinations(others, r)]
        cols.append(torch.stack(terms).sum(0))
    return torch.stack(cols, dim=1)


def sample_copies(phi: float) -> int:
    """How many copies the sample-level rule gives a modality with contribution ``phi``."""
    if 0.4 < phi < 1:
        return 1
    if -0.1 < phi < 0.4:
        return 2
    if phi < -0.1:
        return 3
    return 0


def _keep(features: dict[str, torch.Tensor], kept: torch.Tensor, names: tuple[str, ...]) -> dict:
    """Features with modality j of row i zeroed where ``kept[i, j]`` is False."""
    return {u: torch.where(kept[:, names.index(u), None].to(f.device), f, torch.zeros((), dtype=f.dtype,
                                                                                     device=f.device))
            if u in names else f for u, f in features.items()}


class _Valuation(Method):
    max_modalities = 2
    needs = ("forward", "keys")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.copies: dict[str, list[int]] = {}      # key -> the modality index each copy keeps
        self.phi_mean: list[float] = []
        self.extra: dict[str, float] = {}            # the plan's own step stats
        self._planned: int | None = None

    # -- valuation

    @torch.no_grad()
    def values(self, start: EpochStart) -> tuple[list[str], torch.Tensor]:
        """This rank's keys of the epoch and their Shapley values (N, M), model in eval mode."""
        assert start.keyed_batches is not None, f"{self.name} needs keyed training batches"
        m = start.modalities
        names = m.names
        kept_sets = [c for r in range(1, len(names) + 1) for c in combinations(names, r)]
        keys, phis = [], []
        was_training = m.model.training
        m.model.eval()
        t0, total = time.monotonic(), start.steps or 0
        try:
            for done, (inputs, labels, batch_keys) in enumerate(start.keyed_batches(start.epoch), 1):
                correct = {}
                for kept in kept_sets:
                    mask = torch.tensor([u in kept for u in names]).expand(len(labels), -1)
                    hook = None if len(kept) == len(names) else (lambda f, mask=mask: _keep(f, mask, names))
                    correct[kept] = m.run(inputs, hook).logits.argmax(1) == labels
                phis.append(shapley(correct, names).cpu())
                keys += list(batch_keys)
                start.emit(progress_event(self.name, "sample valuation", done, max(total, done), t0, time.monotonic()))
        finally:
            m.model.train(was_training)
        return keys, torch.cat(phis) if phis else torch.zeros(0, len(names), dtype=torch.float64)

    def plan(self, keys: list[str], phi: torch.Tensor, start: EpochStart) -> dict[str, list[int]]:
        raise NotImplementedError

    def begin_epoch(self, start: EpochStart) -> None:
        self.copies, self._planned = {}, None
        if not self.active(start.epoch) or len(start.modalities.names) < 2:
            return
        keys, phi = self.values(start)
        total = start.reduce(torch.cat([phi.sum(0), phi.new_tensor([len(keys)])]).to(_device(start)))
        self.phi_mean = (total[:-1] / total[-1].clamp(min=1)).tolist()
        self.copies = self.plan(keys, phi, start)
        self._planned = start.epoch

    # -- training

    def train_step(self, step: Step, run: StepRun) -> StepResult | None:
        if not self.active(step.epoch) or len(step.modalities.names) < 2:
            return super().train_step(step, run)
        if self._planned != step.epoch:
            raise RuntimeError(f"{self.name}: call balancer.begin_epoch({step.epoch}, keyed_batches=...) before "
                               "the epoch's steps (it values the samples there)")
        assert step.keys is not None and step.inputs is not None, f"{self.name} needs the batch's keys and inputs"
        names, labels = step.modalities.names, step.labels
        rows, kept = list(range(len(labels))), [[True] * len(names) for _ in labels]
        for i, key in enumerate(step.keys):
            for j in self.copies.get(key, ()):
                rows.append(i)
                kept.append([k == j for k in range(len(names))])
        sizes = step.reduce(torch.tensor([float(len(rows)), float(len(labels))], dtype=torch.float64,
                                         device=labels.device))
        parts = max(1, math.floor(float(sizes[0]) / float(sizes[1]) + 0.5))    # updates of about a batch
        g = step.local_generator
        order = torch.randperm(len(rows), generator=g, device=g.device).to(labels.device)
        rows_t = torch.tensor(rows, device=labels.device)
        kept_t = torch.tensor(kept, dtype=torch.bool, device=labels.device)
        outs, ys, losses, stats = [], [], [], {}
        for part in torch.tensor_split(order, parts):
            weight = step.weight
            if len(part) == 0:          # a rank with fewer rows than parts: a step that changes nothing
                part, weight = order[:1], 0.0
            idx = rows_t[part]
            y, mask = labels[idx], kept_t[part]
            out = run.forward({u: x[idx] for u, x in step.inputs.items()},
                              hook=lambda f, mask=mask: _keep(f, mask, names))
            loss = F.cross_entropy(out.logits.float(), y) + out.loss_terms(y)
            if not run.backward(loss * weight):
                return None
            stats = Method.after_backward(self, out, dataclasses.replace(step, labels=y))     # rho, k = 1
            run.update()
            if weight:
                outs.append(out)
                ys.append(y)
                losses.append(loss.detach() * len(y))
        y_all = torch.cat(ys)
        stats.update({f"phi_{step.modalities.tags[u]}": p for u, p in zip(names, self.phi_mean)},
                     copies=float(len(rows) - len(labels)), **self.extra)
        return StepResult(Output.cat(outs), torch.stack(losses).sum() / len(y_all), stats, y_all, run.updates)


def _device(start: EpochStart) -> torch.device:
    return next(start.modalities.model.parameters()).device


class SampleValuation(_Valuation):
    name = "valuation-sample"

    def plan(self, keys, phi, start):
        return {k: [j for j, p in enumerate(row) for _ in range(sample_copies(p))]
                for k, row in zip(keys, phi.tolist())}


class ModalityValuation(_Valuation):
    name = "valuation-modality"
    options = ("valuation_part_ratio",)

    def __init__(self, *, valuation_part_ratio: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 < valuation_part_ratio <= 1.0:
            raise ValueError("valuation_part_ratio must be in (0, 1]")
        self.part_ratio = float(valuation_part_ratio)

    def plan(self, keys, phi, start):
        n = len(keys)
        g = step_generator(start.seed, start.epoch, torch.device("cpu"), start.rank, 2)
        z = torch.randint(n, (int(self.part_ratio * n),), generator=g) if n else torch.zeros(0, dtype=torch.long)
        total = start.reduce(torch.cat([phi[z].sum(0), phi.new_tensor([len(z)])]).to(_device(start))).cpu()
        self.extra = {"valuation_d": 0.0}
        if float(total[-1]) == 0:
            return {}
        gap = 1.0 - total[:-1] / total[-1]
        d = float((gap[0] - gap[1]).abs()) / 3 * 2
        self.extra["valuation_d"] = d
        weak = 0 if float(gap[0]) > float(gap[1]) else 1
        copies: dict[str, list[int]] = {}
        for i in torch.randint(max(n, 1), (int(d * n),), generator=g).tolist():
            copies.setdefault(keys[i], []).append(weak)
        return copies
