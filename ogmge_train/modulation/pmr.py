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
(as the CE terms are), so the dominant modality is kept from converging early. Gradients are
not modulated. Works with every fusion (it reads pooled features
only). ``rho_a``/``rho_v`` in the step stats are the prototype ratios ``r``, ``1/r``; ``k_*`` the
loss weights ``beta``, ``lam`` (when the method is active).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F

from .base import EpochStart, Method, Step

if TYPE_CHECKING:
    from ..models import AVModel


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

    def __init__(self, *, pmr_alpha: float = 1.0, pmr_momentum: float = 0.2, pmr_entropy: float = 0.0,
                 pmr_entropy_epochs: int = 10, **kwargs):
        super().__init__(**kwargs)
        if pmr_alpha < 0 or not 0.0 <= pmr_momentum <= 1.0 or pmr_entropy < 0 or pmr_entropy_epochs < 0:
            raise ValueError("pmr_alpha, pmr_entropy and pmr_entropy_epochs must be >= 0 and pmr_momentum in [0, 1]")
        self.pmr_alpha, self.momentum = float(pmr_alpha), float(pmr_momentum)
        self.entropy, self.entropy_epochs = float(pmr_entropy), int(pmr_entropy_epochs)
        self.proto_a: torch.Tensor | None = None
        self.proto_v: torch.Tensor | None = None
        self._stats = {"rho_a": 1.0, "rho_v": 1.0, "k_a": 1.0, "k_v": 1.0}
        self._weights: torch.Tensor | None = None

    # -- prototypes

    @torch.no_grad()
    def begin_epoch(self, start: EpochStart) -> None:
        model = cast("AVModel", start.model)     # the unwrapped AVModel (see EpochStart)
        if model.modality != "both":
            return
        was_training = model.training
        model.eval()
        sums: torch.Tensor | None = None
        counts: torch.Tensor | None = None
        for audio, visual, labels in start.batches(max(1, start.steps // 10)):
            out = model(audio, visual)
            if sums is None or counts is None:      # both set by the first batch
                c = model.num_classes
                sums = torch.zeros(2, c, out.feat_a.shape[1], dtype=torch.float64, device=labels.device)
                counts = torch.zeros(c, dtype=torch.float64, device=labels.device)
            sums[0].index_add_(0, labels, out.feat_a.double())
            sums[1].index_add_(0, labels, out.feat_v.double())
            counts += torch.bincount(labels, minlength=len(counts)).double()
        model.train(was_training)
        assert sums is not None and counts is not None, "pmr: no training batches for the prototypes"
        both = start.reduce(torch.cat([sums.flatten(), counts]))
        sums, counts = both[: sums.numel()].view_as(sums), both[sums.numel():]
        seen = (counts > 0).view(1, -1, 1)
        new = torch.where(seen, sums / counts.clamp(min=1).view(1, -1, 1), torch.zeros_like(sums)).float()
        if self.proto_a is None:
            self.proto_a, self.proto_v = new[0], new[1]
            return
        assert self.proto_v is not None     # set together with proto_a
        old = torch.stack([self.proto_a.to(new.device), self.proto_v.to(new.device)])
        mixed = torch.where(seen, (1 - self.momentum) * new + self.momentum * old, old)
        self.proto_a, self.proto_v = mixed[0], mixed[1]

    # -- the loss

    def loss(self, out, step: Step) -> torch.Tensor:
        loss = F.cross_entropy(out.logits.float(), step.labels)
        self._stats = {"rho_a": 1.0, "rho_v": 1.0, "k_a": 0.0, "k_v": 0.0}
        if out.feat_a is None or out.feat_v is None or self.proto_a is None or not self.active(step.epoch):
            return loss
        assert self.proto_v is not None     # set together with proto_a
        sim_a = prototype_logits(out.feat_a, self.proto_a)
        sim_v = prototype_logits(out.feat_v, self.proto_v)
        scores = step.reduce(torch.stack([true_class_score(sim_a, step.labels), true_class_score(sim_v, step.labels)]))
        r = scores[0] / scores[1]
        a = self.pmr_alpha
        # [beta, lam] as tensors: no host sync before backward
        weights = torch.stack([torch.where(r < 1, a, 0.0), torch.where(r > 1, a, 0.0)]).float()
        self._weights = torch.cat([torch.stack([r, 1 / r]).float(), weights])
        loss = (loss + weights[0] * F.cross_entropy(sim_a, step.labels)
                + weights[1] * F.cross_entropy(sim_v, step.labels))
        if self.entropy > 0 and step.epoch < self.start_epoch + self.entropy_epochs:
            dominant = torch.stack([r > 1, r < 1]).float()          # [audio, visual]
            loss = loss - self.entropy * (dominant[0] * mean_entropy(sim_a) + dominant[1] * mean_entropy(sim_v))
        return loss

    def after_backward(self, model, out, labels, *, epoch: int, all_reduce=None, generator=None):
        if self._weights is None:
            return dict(self._stats)
        rho_a, rho_v, beta, lam = self._weights.tolist()
        self._weights = None
        return {"rho_a": rho_a, "rho_v": rho_v, "k_a": beta, "k_v": lam}

    # -- resume

    def state_dict(self) -> dict:
        if self.proto_a is None:
            return {}
        assert self.proto_v is not None     # set together with proto_a
        return {"proto_a": self.proto_a.cpu(), "proto_v": self.proto_v.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.proto_a, self.proto_v = state["proto_a"], state["proto_v"]
