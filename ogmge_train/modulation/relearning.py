"""``relearning``: Diagnosing & Re-learning (Wei, Li, Feng, Hu, ECCV 2024), as its official code.

Diagnosis: the learning state of modality u is the separability of its representation space,
measured as the gap between the clustering purity of its pooled features on the training part
and on a held-out part of train (the official code clusters ``my_train`` and ``val``, two
disjoint parts of CREMA-D's train list; here ``relearn_holdout`` of train, 11% by default as
there, chosen by a hash of the sample key and never trained on):

- features of every sample of the epoch's order (model in eval mode, no gradient), gathered over
  ranks and sorted by key, so every rank clusters the same matrix;
- each part's features scaled per dimension to [-1, 1] (min-max), then k-means with k = the
  number of classes (k-means++ seeding from a generator seeded with 0, Lloyd iterations until no
  label changes or the centre shift is below 1e-4 x the mean feature variance, at most 300);
- purity = the fraction of samples whose label is the majority label of their cluster;
- ``w_u = tanh(lambda * |purity_train_u - purity_heldout_u|)`` (``relearn_lambda`` = 3).

Re-learning: every encoder parameter of u is softly re-initialised,
``theta_u <- w_u * theta0_u + (1 - w_u) * theta_u`` with theta0 the parameters before the first
training step (kept in the method state until the last re-initialisation). The official code does
this after the training and evaluation of epochs R, 2R, ..., N*R (``relearn_every`` R = 20,
``relearn_times`` N = 3); here before epochs start+R+1, ..., start+N*R+1 (the same moments;
``start`` = ``--modulation-start``; ``--modulation-end`` does not cut the schedule). The optimizer
state is left alone, as there. Loss: cross-entropy of the fused logits. Every fusion, any number
of modalities (one weight each). Step stats: ``relearn_w_<tag>`` (``relearn_w_a``, ``relearn_w_v``:
the last weights, 0 before the first diagnosis).
"""
from __future__ import annotations

import math

import torch

from .. import dist
from .base import EpochStart, Method
from .gradient_blending import held_out

KMEANS_SEED = 0        # the official code's KMeans(random_state=0)
KMEANS_ITERS = 300     # scikit-learn's defaults, which the official code uses
KMEANS_TOL = 1e-4


def minmax_scale(x: torch.Tensor) -> torch.Tensor:
    """Each column mapped linearly onto [-1, 1]; a constant column becomes -1."""
    lo, hi = x.min(dim=0).values, x.max(dim=0).values
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    return (x - lo) / span * 2 - 1


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k initial centres: the first uniformly, each next with probability proportional to the
    squared distance to the nearest centre chosen so far."""
    first = int(torch.randint(len(x), (1,), generator=generator))
    centres = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(dim=1)
    for _ in range(1, k):
        weights = d2 if float(d2.sum()) > 0 else torch.ones_like(d2)
        i = int(torch.multinomial(weights / weights.sum(), 1, generator=generator))
        centres.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(dim=1))
    return torch.stack(centres)


def lloyd(x: torch.Tensor, centres: torch.Tensor, iters: int = KMEANS_ITERS, tol: float = KMEANS_TOL) -> torch.Tensor:
    """Cluster labels after Lloyd iterations from ``centres`` (an empty cluster keeps its centre)."""
    tol = float(x.var(dim=0, unbiased=False).mean()) * tol
    labels = torch.cdist(x, centres).argmin(dim=1)
    for _ in range(iters):
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=len(centres)).to(x.dtype)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
        shift = float(((new - centres) ** 2).sum())
        centres = new
        new_labels = torch.cdist(x, centres).argmin(dim=1)
        if torch.equal(new_labels, labels) or shift <= tol:
            labels = new_labels
            break
        labels = new_labels
    return labels


def purity(labels: torch.Tensor, clusters: torch.Tensor) -> float:
    """Fraction of samples whose label is the most frequent label of their cluster."""
    agree = 0
    for c in clusters.unique():
        agree += int(torch.bincount(labels[clusters == c]).max())
    return agree / len(labels)


def cluster_purity(features: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Purity of k-means on min-max scaled features (float64, seeded: the same on every rank)."""
    x = minmax_scale(features.double())
    g = torch.Generator().manual_seed(KMEANS_SEED)
    return purity(labels, lloyd(x, kmeans_plus_plus(x, k, g)))


class ReLearning(Method):
    name = "relearning"
    options = ("relearn_lambda", "relearn_every", "relearn_times", "relearn_holdout")
    needs = ("forward", "num_classes")

    def __init__(self, *, relearn_lambda: float = 3.0, relearn_every: int = 20, relearn_times: int = 3,
                 relearn_holdout: float = 0.11, **kwargs):
        super().__init__(**kwargs)
        if relearn_lambda < 0 or relearn_every < 1 or relearn_times < 0 or not 0.0 < relearn_holdout < 1.0:
            raise ValueError("relearn_lambda must be >= 0, relearn_every >= 1, relearn_times >= 0 and "
                             "relearn_holdout in (0, 1)")
        self.lam, self.every, self.times = float(relearn_lambda), int(relearn_every), int(relearn_times)
        self.holdout = float(relearn_holdout)
        self.init: dict[str, torch.Tensor] | None = None     # theta0 of every encoder, "<modality>.<index>"
        self.weights: list[float] = []
        self._tags: list[str] = []

    # -- the held-out part

    def _held(self, keys) -> torch.Tensor:
        return torch.tensor([held_out(k, self.holdout) for k in keys], dtype=torch.bool)

    def train_rows(self, keys):
        return ~self._held(keys)

    # -- schedule

    def due(self, epoch: int) -> int:
        """Which re-initialisation (1..N) runs before ``epoch``, 0 for none."""
        after = epoch - 1 - self.start_epoch
        if after <= 0 or after % self.every:
            return 0
        n = after // self.every
        return n if n <= self.times else 0

    def _last(self) -> int:
        return self.start_epoch + self.times * self.every + 1

    # -- diagnosis

    @torch.no_grad()
    def _features(self, start: EpochStart):
        """(keys, {modality: features}, labels) of every training sample of this epoch's order,
        all ranks, sorted by key (the model in eval mode, no gradient)."""
        assert start.keyed_batches is not None, "relearning needs keyed training batches"
        m = start.modalities
        keys, feats, ys = [], {u: [] for u in m.names}, []
        was_training = m.model.training
        m.model.eval()
        try:
            for inputs, labels, batch_keys in start.keyed_batches(start.epoch):
                out = m.run(inputs)
                keys += list(batch_keys)
                for u in m.names:
                    feats[u].append(out.features[u].double().cpu())
                ys.append(labels.cpu())
        finally:
            m.model.train(was_training)
        parts = dist.all_gather_object((keys, {u: torch.cat(f) for u, f in feats.items()}, torch.cat(ys)))
        keys = [k for p in parts for k in p[0]]
        order = torch.as_tensor(sorted(range(len(keys)), key=keys.__getitem__), dtype=torch.long)
        return ([keys[i] for i in order.tolist()], {u: torch.cat([p[1][u] for p in parts])[order] for u in m.names},
                torch.cat([p[2] for p in parts])[order])

    def diagnose(self, start: EpochStart) -> list[float]:
        """``w_u`` per modality (in ``start.modalities.names`` order) from the purity gaps."""
        keys, feats, labels = self._features(start)
        held = self._held(keys)
        k = start.modalities.num_classes
        assert k is not None
        if int(held.sum()) < k or int((~held).sum()) < k:
            raise ValueError(f"relearning: {int(held.sum())} held-out and {int((~held).sum())} train samples; "
                             f"both parts need at least {k} (one per cluster); change --relearn-holdout")
        weights = []
        for u in start.modalities.names:
            f = feats[u]
            gap = abs(cluster_purity(f[~held], labels[~held], k) - cluster_purity(f[held], labels[held], k))
            weights.append(math.tanh(self.lam * gap))
        return weights

    def setup(self, modalities):
        self.weights = [0.0] * len(modalities.names)
        self._tags = [modalities.tags[u] for u in modalities.names]
        return None

    @torch.no_grad()
    def begin_epoch(self, start: EpochStart) -> None:
        m = start.modalities
        if self.init is None and start.epoch < self._last():
            self.init = {f"{u}.{i}": p.detach().clone() for u in m.names for i, p in enumerate(m.params(u))}
        if not self.due(start.epoch):
            return
        assert self.init is not None, "relearning: theta0 missing (not captured before training)"
        self.weights = self.diagnose(start)
        for w, u in zip(self.weights, m.names):
            for i, p in enumerate(m.params(u)):
                p.copy_(w * self.init[f"{u}.{i}"].to(p.device) + (1 - w) * p)
        if self.due(start.epoch) == self.times:
            self.init = None                  # no re-initialisation left: theta0 is not needed

    # -- training

    def after_backward(self, out, step):
        stats = super().after_backward(out, step)
        return {**stats, **{f"relearn_w_{t}": w for t, w in zip(self._tags, self.weights)}}

    # -- resume

    def state_dict(self) -> dict:
        state: dict = {"weights": torch.tensor(self.weights, dtype=torch.float64)}
        if self.init is not None:
            state["init"] = {n: t.cpu() for n, t in self.init.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.weights = state["weights"].tolist()
            self.init = dict(state["init"]) if "init" in state else None
