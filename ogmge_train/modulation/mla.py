"""``mla``: Multimodal Learning with Alternating Unimodal Adaptation (Zhang, Yoon, Bansal, Yao,
CVPR 2024), as its official code (``main.py`` with ``--gs_flag``, ``utils.GSPlugin``) and
BalanceBenchmark's ``MLA_trainer`` run it.

One linear head ``h(f) = W f + b`` shared by every modality (``setup``: ``model.aux_heads``;
every encoder's features must have the same width) replaces the fusion head. Per batch, for
each modality u in turn (the model side's order: audio, then visual):

1. ``L_u = CE(h(f_u), y)`` back-propagated into encoder u and the head only (the other
   parameters get no update in this round: no gradient, no weight decay, no momentum);
2. gradient modification of the head weight (orthogonal weight modification): with ``r`` the
   batch mean of ``f_u`` (the global batch under DDP) and ``a = 0.1^(1 + i/n)`` (i the batch
   index in the epoch, n the batches per epoch),
   ``k = P r``, ``P <- P - k k^T / (a + r^T k)``, ``P <- P / ||P||_F``, then
   ``grad W <- grad W P^T`` (P starts as the identity; nothing happens in the run's very first
   round, as there);
3. an optimizer step.

So a batch makes M optimizer updates. Evaluation (``fuse``): ``z_u = h(f_u)``, per sample
``H_u = -sum_c softmax(z_u)_c log softmax(z_u)_c``, ``w_u = exp(max_k H_k - H_u) / sum_j
exp(max_k H_k - H_j)``, fused ``sum_u w_u z_u`` (``unimodal``: the ``z_u``). Outside the
active epochs a step back-propagates ``CE`` of that fused output (BalanceBenchmark's else
branch). Works with any number of modalities; our fusion head is not used, so only the default
``--fusion concat`` is accepted (its parameters stay as initialised). Every round runs the whole
model through the training module (under DDP every parameter must be reached: the unused ones
get exact zero gradients, then none); the official code runs one forward per batch, so the
buffers (BatchNorm's running statistics) after the first round's forward are kept. Step stats: ``rho_<tag>`` from
the ``z_u`` (k = 1), ``mla_loss_<tag>``. State: P and the number of rounds so far.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modalities import Modalities, Output
from ..names import METHOD_FUSIONS
from .base import EpochStart, Method, Step, StepResult, StepRun, keep_grads, shared_head


def gating_weights(logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-sample ``w_u`` (B, 1) from each modality's logits: lower entropy, larger weight."""
    entropy = {u: -(z.float().log_softmax(1).exp() * z.float().log_softmax(1)).sum(1, keepdim=True)
               for u, z in logits.items()}
    top = torch.stack(list(entropy.values())).max(dim=0).values
    raw = {u: torch.exp(top - h) for u, h in entropy.items()}
    total = sum(raw.values())
    return {u: w / total for u, w in raw.items()}


def gated_fusion(logits: dict[str, torch.Tensor]) -> torch.Tensor:
    weights = gating_weights(logits)
    return torch.stack([z * weights[u].to(z.dtype) for u, z in logits.items()]).sum(0)


@torch.no_grad()
def update_projection(P: torch.Tensor, r: torch.Tensor, alpha: float) -> torch.Tensor:
    """``P - k k^T / (alpha + r^T k)`` with ``k = P r``, divided by its Frobenius norm."""
    k = P @ r
    P = P - torch.outer(k, k) / (alpha + r @ k)
    return P / torch.linalg.matrix_norm(P)


class MLA(Method):
    name = "mla"
    fusions = METHOD_FUSIONS["mla"]
    options = ("head_init",)
    needs = ("forward", "num_classes", "dims")
    accumulation = False

    def __init__(self, *, head_init: str = "xavier", **kwargs):
        super().__init__(**kwargs)
        self.head_init = head_init
        self.P: torch.Tensor | None = None
        self.rounds = 0                      # gradient-modification rounds so far (the official exp_count)
        self._batch, self._batches = 0, 1

    def setup(self, modalities: Modalities) -> nn.Module:
        return shared_head(modalities, "its head", self.head_init)      # xavier: the official weight_init

    def begin_epoch(self, start: EpochStart) -> None:
        if start.steps is None:
            raise ValueError("mla needs the batches per epoch: call begin_epoch(epoch, steps=n, ...)")
        self._batch, self._batches = 0, max(int(start.steps), 1)

    # -- evaluation

    def unimodal(self, out: Output, modalities: Modalities) -> dict[str, torch.Tensor]:
        head = modalities.aux
        assert head is not None, "mla: its shared head was not set up (build it with a Balancer)"
        return {u: head(out.features[u]) for u in modalities.names}

    def fuse(self, out: Output, modalities: Modalities) -> torch.Tensor:
        return gated_fusion(self.unimodal(out, modalities))

    # -- training

    def train_step(self, step: Step, run: StepRun) -> StepResult | None:
        m = step.modalities
        head = m.aux
        assert isinstance(head, nn.Linear), "mla: its shared head was not set up (build it with a Balancer)"
        if not self.active(step.epoch):
            out = run.forward()
            logits = {u: head(out.features[u]) for u in m.names}
            loss = F.cross_entropy(gated_fusion(logits).float(), step.labels) + 0.0 * out.logits.float().sum()
            if not run.backward(loss * step.weight):
                return None
            keep_grads(m.model, [*(p for u in m.names for p in m.params(u)), *head.parameters()])
            run.update()
            self._batch += 1
            return self._result(out, logits, {u: loss.detach() for u in m.names}, loss.detach(), step, run)
        logits, losses, kept = {}, {}, None
        for u in m.names:
            out = run.forward()
            buffers = list(m.model.buffers())
            if kept is None:
                kept = [b.detach().clone() for b in buffers]
            z = head(out.features[u])
            loss = F.cross_entropy(z.float(), step.labels)
            if not run.backward((loss + 0.0 * out.logits.float().sum()) * step.weight):
                return None
            with torch.no_grad():      # the batch counts once in BatchNorm's running statistics
                for b, k in zip(buffers, kept):
                    b.copy_(k)
            keep_grads(m.model, [*m.params(u), *head.parameters()])
            self._project(head, out.features[u].detach(), step)
            run.update()
            logits[u], losses[u] = z.detach(), loss.detach()
        self._batch += 1
        mean = torch.stack(list(losses.values())).mean()
        return self._result(out, logits, losses, mean, step, run)

    def _project(self, head: nn.Linear, features: torch.Tensor, step: Step) -> None:
        if self.rounds > 0 and head.weight.grad is not None:
            count = features.new_full((1,), features.shape[0]).float()
            total = step.reduce(torch.cat([features.float().sum(0), count]))
            r = total[:-1] / total[-1]
            if self.P is None:
                self.P = torch.eye(r.numel(), device=r.device)
            alpha = 0.1 ** (1 + self._batch / self._batches)
            self.P = update_projection(self.P.to(r.device), r, alpha)
            with torch.no_grad():
                head.weight.grad.copy_(head.weight.grad @ self.P.T.to(head.weight.grad.dtype))
        self.rounds += 1

    def _result(self, out: Output, logits: dict, losses: dict, loss: torch.Tensor, step: Step,
                run: StepRun) -> StepResult:
        mine = Output(gated_fusion(logits).detach(), logits, {u: f.detach() for u, f in out.features.items()})
        stats = super().after_backward(mine, step)           # rho from the shared head's logits, k = 1
        values = torch.stack([losses[u] for u in step.modalities.names]).tolist()
        stats.update({f"mla_loss_{step.modalities.tags[u]}": v for u, v in zip(step.modalities.names, values)})
        return StepResult(mine, loss, stats, step.labels, run.updates)

    # -- resume

    def state_dict(self) -> dict:
        state: dict = {"rounds": torch.tensor(self.rounds)}
        if self.P is not None:
            state["P"] = self.P.detach().cpu()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.rounds = int(state["rounds"])
            self.P = state["P"].clone() if "P" in state else None
