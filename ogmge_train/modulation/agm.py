"""``agm``: Adaptive Gradient Modulation (Li et al., ICCV 2023), as BalanceBenchmark's AGM trainer
runs it for two modalities (the authors' repository was not available to us; see README).

Per step, before the training forward ``f(a, v)``:

- mono-modal responses from the model in eval mode without gradient, the other input zeroed:
  ``m_a = (f(a, v) - f(0, v)) / 2``, ``m_v = (f(a, v) - f(a, 0)) / 2`` (the Shapley term of the
  non-empty coalition; logits, f in eval mode);
- ``s_u`` = mean over the batch of ``-log softmax(m_u)[y]`` (probabilities below 1e-8 count as
  1e-8), all-reduced under DDP; ``s̄`` = mean of ``s_a, s_v``;
- ``ratio_u = exp(2 (s_u - s̄))``, ``target_u = exp(2 (t_u - t̄))`` from the running means ``t_u``
  of ``s_u`` over all steps so far (0 before the first step), ``k_u = exp(alpha * min(target_u -
  ratio_u, 7))``; then ``t_u <- t_u (n - 1)/n + s_u / n`` with n the 1-based step number;
- after backward, modality u's conv-weight gradients are multiplied by ``k_u`` (active epochs);
- if any fusion-head weight gradient leaves [-5, 5], all gradients are clipped to norm 5.

Loss: cross-entropy of the fused logits. Works with every fusion. Defined for two modalities
(the mono-modal response keeps one Shapley coalition; the benchmark's code gives no rule for
more), so a model with three refuses it. A model of one's own gives ``forward`` and ``head``
(the parameters whose gradients are checked against [-5, 5]). State: ``t_a, t_v``.
"""
from __future__ import annotations

import math

import torch

from .base import Method, Step

CLIP_AT = 5.0


@torch.no_grad()
def mono_responses(step: Step) -> list[torch.Tensor]:
    """``[m_u]`` from the model in eval mode (restores its mode): ``(f(x) - f(x with u zeroed)) / 2``."""
    model, inputs = step.model, step.inputs
    assert inputs is not None
    was_training = model.training
    model.eval()
    try:
        full = step.forward(inputs).logits
        without = [step.forward({**inputs, u: torch.zeros_like(inputs[u])}).logits for u in step.modalities.names]
    finally:
        model.train(was_training)
    return [0.5 * (full - w) for w in without]


def neg_log_true(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of ``-log p(y)``, p floored at 1e-8 (float64)."""
    p = logits.float().softmax(dim=1).gather(1, labels.view(-1, 1)).squeeze(1).double()
    return -torch.log(p.clamp(min=1e-8)).sum()


class AGM(Method):
    name = "agm"
    options = ("agm_alpha",)
    max_modalities = 2
    needs = ("forward", "head", "inputs")
    accumulation = False     # the running scores advance once per batch

    def __init__(self, *, agm_alpha: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        if agm_alpha < 0:
            raise ValueError(f"agm_alpha must be >= 0, not {agm_alpha}")
        self.agm_alpha = float(agm_alpha)
        self.train_scores = [0.0, 0.0]
        self._k: list[float] | None = None

    def begin_step(self, step: Step) -> None:
        self._k = None
        if step.inputs is not None and len(step.modalities.names) == 2:
            m_a, m_v = mono_responses(step)
            n = float(len(step.labels))
            sums = step.reduce(torch.stack([neg_log_true(m_a, step.labels), neg_log_true(m_v, step.labels),
                                            torch.tensor(n, dtype=torch.float64, device=m_a.device)]))
            s_a, s_v, total = sums.tolist()
            self._k = self.coefficients(s_a / total, s_v / total, step.step + 1)

    def coefficients(self, s_a: float, s_v: float, iteration: int) -> list[float]:
        """``[k_a, k_v]`` from this step's scores; updates the running means."""
        scores, mean = [s_a, s_v], (s_a + s_v) / 2
        t_mean = sum(self.train_scores) / 2
        k = []
        for u in range(2):
            ratio = math.exp(2 * (scores[u] - mean))
            target = math.exp(2 * (self.train_scores[u] - t_mean))
            k.append(math.exp(self.agm_alpha * min(target - ratio, 7)))
        for u in range(2):
            self.train_scores[u] = self.train_scores[u] * (iteration - 1) / iteration + scores[u] / iteration
        return k

    @torch.no_grad()
    def after_backward(self, out, step: Step):
        stats = super().after_backward(out, step)
        if self._k is None:
            return stats
        m = step.modalities
        k = self._k if self.active(step.epoch) else [1.0, 1.0]
        for u, name in enumerate(m.names):
            for p in m.modulated(name):
                if p.grad is not None:
                    p.grad.mul_(k[u])
        head_grads = [p.grad for p in m.head_params() if p.grad is not None]
        if head_grads and max(g.abs().max().item() for g in head_grads) > CLIP_AT:
            torch.nn.utils.clip_grad_norm_(step.model.parameters(), max_norm=CLIP_AT)
        a, v = (m.tags[u] for u in m.names)
        stats.update({f"k_{a}": k[0], f"k_{v}": k[1], f"agm_t_{a}": self.train_scores[0],
                      f"agm_t_{v}": self.train_scores[1]})
        return stats

    def state_dict(self) -> dict:
        return {"train_scores": torch.tensor(self.train_scores, dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.train_scores = state["train_scores"].tolist()
