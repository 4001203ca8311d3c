"""``pmr``: Prototypical Modal Rebalance (Fan, Xu, Wei, Hu, CVPR 2023), as its official code.

Prototypes: before each training epoch, ``p_u[c]`` = mean pooled feature of modality u over the
samples of class c in the first ``max(1, steps // 10)`` training batches (model in eval mode,
no gradient); from the second epoch on, ``p_u <- (1 - m) * new + m * old`` (``m`` = momentum,
0.2). Under DDP the class sums and counts are all-reduced, so every rank holds the same
prototypes. A class absent from those batches keeps its previous prototype (zero at the start;
the reference code divides by zero there).

Per step: ``sim_u = -||feat_u - p_u[c]||`` (B x C), ``s_u = sum_i softmax(sim_u)_i[y_i]``
(all-reduced), ``r = s_a / s_v``. In the active epochs the loss is
``CE(fused) + beta * CE(sim_a) + lam * CE(sim_v)`` with ``lam = alpha, beta = 0`` if ``r > 1``,
``beta = alpha, lam = 0`` if ``r < 1``, both 0 if ``r == 1``: the weaker modality's prototype
loss is added (the released code's weights; the paper's eq. 11 scales them by
``clip(0, r - 1, 1)`` or ``clip(0, 1/r - 1, 1)``). With ``pmr_entropy`` = mu > 0, the
prototypical entropy regularisation (PER, the paper's eq. 13, not in the released code) is
subtracted in the first ``pmr_entropy_epochs`` active epochs: ``- mu * H(softmax(sim_u))`` for the
dominant modality u (``r > 1``: audio), H the entropy over classes, averaged over the batch
(as the CE terms are), so the dominant modality is kept from converging early. With more
modalities, ``r`` becomes OGM's discrepancy ``rho_u = s_u / mean_{w != u} s_w``: every modality
with ``rho_u < 1`` gets ``alpha * CE(sim_u)``, every one with ``rho_u > 1`` the PER term (for two,
the rules above). Gradients are not modulated. Works with every fusion (it reads pooled features only).
``rho_<tag>`` in the step stats are the prototype ratios (``r``, ``1/r``); ``k_<tag>`` the loss
weights (``beta``, ``lam``) when the method is active.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import EpochStart, Method, Step, discrepancy, unit_stats


def prototype_logits(feat: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """``-||feat_i - p_c||`` for every sample i and class c: (B, C)."""
    diff = feat.float()[:, None, :] - protos.to(feat.device).float()[None, :, :]
    return -diff.pow(2).sum(dim=2).sqrt()


def mean_entropy(sim: torch.Tensor) -> torch.Tensor:
    """Batch mean of the entropy of ``softmax(sim)`` over classes (PER's H)."""
    logp = sim.log_softmax(dim=1)
    return -(logp.exp() * logp).sum(dim=1).mean()


def true_class_score(sim: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return sim.detach().softmax(dim=1).gather(1, labels.view(-1, 1)).double().sum()


class PMR(Method):
    name = "pmr"
    options = ("pmr_alpha", "pmr_momentum", "pmr_entropy", "pmr_entropy_epochs")
    needs = ("forward", "num_classes")
    accumulation = False     # the loss weights come from the batch's prototype scores

    def __init__(self, *, pmr_alpha: float = 1.0, pmr_momentum: float = 0.2, pmr_entropy: float = 0.0,
                 pmr_entropy_epochs: int = 10, **kwargs):
        super().__init__(**kwargs)
        if pmr_alpha < 0 or not 0.0 <= pmr_momentum <= 1.0 or pmr_entropy < 0 or pmr_entropy_epochs < 0:
            raise ValueError("pmr_alpha, pmr_entropy and pmr_entropy_epochs must be >= 0 and pmr_momentum in [0, 1]")
        self.pmr_alpha, self.momentum = float(pmr_alpha), float(pmr_momentum)
        self.entropy, self.entropy_epochs = float(pmr_entropy), int(pmr_entropy_epochs)
        self.protos: dict[str, torch.Tensor] | None = None      # modality -> (C, D_u)
        self._stats: dict[str, float] | None = None
        self._weights: torch.Tensor | None = None

    # -- prototypes

    @torch.no_grad()
    def begin_epoch(self, start: EpochStart) -> None:
        m = start.modalities
        if start.batches is None or start.steps is None:
            raise ConfigError("pmr builds class prototypes before each epoch: "
                              "call begin_epoch(epoch, steps=..., batches=...)")
        model = start.model
        was_training = model.training
        model.eval()
        sums: dict[str, torch.Tensor] | None = None
        counts: torch.Tensor | None = None
        for inputs, labels in start.batches(max(1, start.steps // 10)):
            out = m.run(inputs)
            if sums is None or counts is None:      # both set by the first batch
                c = int(m.num_classes or 0)
                sums = {u: torch.zeros(c, out.features[u].shape[1], dtype=torch.float64, device=labels.device)
                        for u in m.names}
                counts = torch.zeros(c, dtype=torch.float64, device=labels.device)
            for u in m.names:
                sums[u].index_add_(0, labels, out.features[u].double())
            counts += torch.bincount(labels, minlength=len(counts)).double()
        model.train(was_training)
        assert sums is not None and counts is not None, "pmr: no training batches for the prototypes"
        both = start.reduce(torch.cat([*(sums[u].flatten() for u in m.names), counts]))
        parts = both.split([*(sums[u].numel() for u in m.names), counts.numel()])
        counts = parts[-1]
        seen = (counts > 0).view(-1, 1)
        new = {u: torch.where(seen, p.view_as(sums[u]) / counts.clamp(min=1).view(-1, 1),
                              torch.zeros_like(sums[u])).float() for u, p in zip(m.names, parts)}
        if self.protos is None:
            self.protos = new
            return
        old = {u: self.protos[u].to(new[u].device) for u in m.names}
        self.protos = {u: torch.where(seen, (1 - self.momentum) * new[u] + self.momentum * old[u], old[u])
                       for u in m.names}

    # -- the loss

    def loss(self, out, step: Step) -> torch.Tensor:
        m = step.modalities
        loss = F.cross_entropy(out.logits.float(), step.labels)
        self._stats = {**unit_stats(m), **{f"k_{m.tags[u]}": 0.0 for u in m.names}}
        if self.protos is None or not self.active(step.epoch):
            return loss
        sims = [prototype_logits(out.features[u], self.protos[u]) for u in m.names]
        scores = step.reduce(torch.stack([true_class_score(sim, step.labels) for sim in sims]))
        rho = discrepancy(scores)
        # a weight per modality as tensors: no host sync before backward
        weights = torch.where(rho < 1, self.pmr_alpha, 0.0).float()
        self._weights = torch.cat([rho.float(), weights])
        for w, sim in zip(weights, sims):
            loss = loss + w * F.cross_entropy(sim, step.labels)
        if self.entropy > 0 and step.epoch < self.start_epoch + self.entropy_epochs:
            dominant = (rho > 1).float()
            per = dominant[0] * mean_entropy(sims[0])
            for d, sim in zip(dominant[1:], sims[1:]):
                per = per + d * mean_entropy(sim)
            loss = loss - self.entropy * per
        return loss

    def after_backward(self, out, step: Step):
        m = step.modalities
        if self._weights is None:
            return dict(self._stats) if self._stats is not None else unit_stats(m)
        values = self._weights.tolist()
        self._weights = None
        tags = [m.tags[u] for u in m.names]
        return dict(zip([*(f"rho_{t}" for t in tags), *(f"k_{t}" for t in tags)], values))

    # -- resume (prototypes saved as proto_<tag>: proto_a, proto_v for audio-visual models)

    def setup(self, modalities):
        self._tags = dict(modalities.tags)
        return None

    def state_dict(self) -> dict:
        if self.protos is None:
            return {}
        return {f"proto_{self._tags[u]}": p.cpu() for u, p in self.protos.items()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.protos = {u: state[f"proto_{t}"] for u, t in self._tags.items()}
