"""``reconboost``: ReconBoost (Hua, Xu, Bao, Yang, Huang, ICML 2024), as BalanceBenchmark's
``ReconBoost_trainer`` runs it (the official ``train.py`` stage by stage, one optimizer).

Each modality's learner is its encoder and one linear head shared by every modality
(``m_u = h(f_u)``; ``setup``: ``model.aux_heads`` with the learnable ``boost_rate`` beta); the
ensemble is ``F = beta * sum_u m_u``. Per batch, for each modality u in turn (the model side's
order), as the benchmark's epoch runs its passes (boost u, rectify, boost the next, rectify):

1. **boost u** (encoder u and the head move): with ``t`` the one-hot label, ``p = softmax(m_u)``
   and ``q = softmax(F_-u)`` of the others' ensemble ``F_-u = beta * sum_{w != u} m_w`` (no
   gradient), per sample ``L = -w1 mean_c(t log p) + w2 mean_c(t q log p)`` (``recon_w1`` 5,
   ``recon_w2`` 1: the official defaults), averaged over the batch, then an optimizer step;
2. **global rectification** (every encoder, the head and beta move): ``CE(F)``, an optimizer step.

So a batch makes 2M optimizer updates (the benchmark's epoch makes 2M passes of one update per
batch: the same updates per epoch, interleaved per batch instead of per pass). The memory
consolidation term ``alpha * MSE(softmax(m_u), softmax(m_prev))`` (prev: the modality before u,
cyclically) has both sides detached in the official code and the benchmark, so it moves nothing;
it is reported (``recon_ga_<tag>``, from the second active epoch, as there), not trained.
Evaluation (``fuse``): ``F``; ``unimodal``: the ``m_u``. Outside the active epochs only the
rectification step runs. Our fusion head is not used: ``--fusion concat`` only (its parameters
stay as initialised). Any number of modalities. Every round runs the whole model through the
training module (DDP: every parameter reached, the unused ones with exact zeros, then none).
Step stats: ``recon_boost_<tag>``, ``recon_ga_<tag>``, ``recon_rate`` (beta); k = 1, rho from the m_u.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modalities import Modalities, Output
from ..names import METHOD_FUSIONS
from .base import Method, Step, StepResult, StepRun, keep_grads, shared_head


class Learners(nn.Module):
    """The shared head and the ensemble's boost rate."""

    def __init__(self, head: nn.Linear, rate: float):
        super().__init__()
        self.head = head
        self.rate = nn.Parameter(torch.tensor(float(rate)))

    def ensemble(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.rate * torch.stack(list(logits.values())).sum(0)


def boosting_loss(own: torch.Tensor, others: torch.Tensor, labels: torch.Tensor, w1: float, w2: float) -> torch.Tensor:
    """``mean_i [-w1 mean_c(t log p) + w2 mean_c(t softmax(others) log p)]``, p = softmax(own)."""
    logp = own.float().log_softmax(1)
    t = F.one_hot(labels, own.shape[1]).to(logp.dtype)
    q = others.detach().float().softmax(1)
    return (-w1 * (t * logp).mean(1) + w2 * (t * q * logp).mean(1)).mean()


class ReconBoost(Method):
    name = "reconboost"
    fusions = METHOD_FUSIONS["reconboost"]
    options = ("recon_w1", "recon_w2", "recon_boost_rate", "head_init")
    needs = ("forward", "num_classes", "dims")
    accumulation = False

    def __init__(self, *, recon_w1: float = 5.0, recon_w2: float = 1.0, recon_boost_rate: float = 1.0,
                 head_init: str = "xavier", **kwargs):
        super().__init__(**kwargs)
        if recon_w1 < 0 or recon_w2 < 0:
            raise ValueError("recon_w1 and recon_w2 must be >= 0")
        self.w1, self.w2, self.rate0 = float(recon_w1), float(recon_w2), float(recon_boost_rate)
        self.head_init = head_init
        self._last: tuple | None = None

    def setup(self, modalities: Modalities) -> nn.Module:
        return Learners(shared_head(modalities, "its head", self.head_init), self.rate0)

    @staticmethod
    def _learners(m: Modalities) -> Learners:
        aux = m.aux
        assert isinstance(aux, Learners), "reconboost: its head was not set up (build it with a Balancer)"
        return aux

    # -- evaluation

    def unimodal(self, out: Output, modalities: Modalities) -> dict[str, torch.Tensor]:
        head = self._learners(modalities).head
        return {u: head(out.features[u]) for u in modalities.names}

    def fuse(self, out: Output, modalities: Modalities) -> torch.Tensor:
        return self._learners(modalities).ensemble(self.unimodal(out, modalities))

    # -- training

    def train_step(self, step: Step, run: StepRun) -> StepResult | None:
        m, learners = step.modalities, self._learners(step.modalities)
        names = list(m.names)
        boosts: dict[str, torch.Tensor] = {}
        consolidation: dict[str, torch.Tensor] = {}
        for u in names if self.active(step.epoch) else []:
            out = run.forward()
            logits = {w: learners.head(out.features[w]) for w in names}
            others = learners.ensemble({w: z.detach() for w, z in logits.items() if w != u})
            loss = boosting_loss(logits[u], others, step.labels, self.w1, self.w2)
            if not run.backward((loss + 0.0 * (out.logits.float().sum() + learners.rate)) * step.weight):
                return None
            keep_grads(m.model, [*m.params(u), *learners.head.parameters()])
            run.update()
            boosts[u] = loss.detach()
            prev = logits[names[names.index(u) - 1]]
            consolidation[u] = (F.mse_loss(logits[u].detach().float().softmax(1), prev.detach().float().softmax(1))
                                if step.epoch > self.start_epoch else loss.new_zeros(()))
            if not self._rectify(step, run, learners):
                return None
        if not boosts and not self._rectify(step, run, learners):
            return None
        return self._result(step, run, learners, boosts, consolidation)

    def _rectify(self, step: Step, run: StepRun, learners: Learners) -> bool:
        out = run.forward()
        logits = {w: learners.head(out.features[w]) for w in step.modalities.names}
        fused = learners.ensemble(logits)
        loss = F.cross_entropy(fused.float(), step.labels)
        if not run.backward((loss + 0.0 * out.logits.float().sum()) * step.weight):
            return False
        m = step.modalities
        keep_grads(m.model, [*(p for u in m.names for p in m.params(u)), *learners.parameters()])
        run.update()
        self._last = (out, {w: z.detach() for w, z in logits.items()}, fused.detach(), loss.detach())
        return True

    def _result(self, step: Step, run: StepRun, learners: Learners, boosts: dict, consolidation: dict) -> StepResult:
        assert self._last is not None
        out, logits, fused, loss = self._last
        mine = Output(fused, logits, {u: f.detach() for u, f in out.features.items()})
        stats = super().after_backward(mine, step)          # rho from the learners' logits, k = 1
        m = step.modalities
        zero = loss.new_zeros(())
        values = torch.stack([*(boosts.get(u, zero) for u in m.names), *(consolidation.get(u, zero) for u in m.names),
                              learners.rate.detach().float()]).tolist()
        n = len(m.names)
        stats.update({f"recon_boost_{m.tags[u]}": values[i] for i, u in enumerate(m.names)})
        stats.update({f"recon_ga_{m.tags[u]}": values[n + i] for i, u in enumerate(m.names)})
        stats["recon_rate"] = values[-1]
        return StepResult(mine, loss, stats, step.labels, run.updates)
