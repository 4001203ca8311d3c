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

Loss: cross-entropy of the fused logits. Works with every fusion. State: ``t_a, t_v``.
"""
from __future__ import annotations

import math

import torch

from .base import Method, Step, _unwrap

CLIP_AT = 5.0


@torch.no_grad()
def mono_responses(model, audio, visual) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m_a, m_v)`` from the model in eval mode (restores its mode)."""
    was_training = model.training
    model.eval()
    try:
        full = model(audio, visual).logits
        visual_only = model(torch.zeros_like(audio), visual).logits
        audio_only = model(audio, torch.zeros_like(visual)).logits
    finally:
        model.train(was_training)
    return 0.5 * (full - visual_only), 0.5 * (full - audio_only)


def neg_log_true(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of ``-log p(y)``, p floored at 1e-8 (float64)."""
    p = logits.float().softmax(dim=1).gather(1, labels.view(-1, 1)).squeeze(1).double()
    return -torch.log(p.clamp(min=1e-8)).sum()


class AGM(Method):
    name = "agm"
    options = ("agm_alpha",)

    def __init__(self, *, agm_alpha: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        if agm_alpha < 0:
            raise ValueError(f"agm_alpha must be >= 0, not {agm_alpha}")
        self.agm_alpha = float(agm_alpha)
        self.train_scores = [0.0, 0.0]
        self._k: list[float] | None = None

    def begin_step(self, step: Step) -> None:
        self._k = None
        model = step.model
        if model.modality == "both" and step.audio is not None:
            m_a, m_v = mono_responses(model, step.audio, step.visual)
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
    def after_backward(self, model, out, labels, *, epoch: int, all_reduce=None, generator=None):
        stats = super().after_backward(model, out, labels, epoch=epoch, all_reduce=all_reduce, generator=generator)
        if self._k is None:
            return stats
        net = _unwrap(model)
        k = self._k if self.active(epoch) else [1.0, 1.0]
        for u, modality in enumerate(("audio", "visual")):
            for _, p in net.modulated_parameters(modality, "conv"):
                if p.grad is not None:
                    p.grad.mul_(k[u])
        head_weights = [m.weight.grad for m in net.head.modules()
                        if isinstance(m, torch.nn.Linear) and m.weight.grad is not None]
        if head_weights and max(g.abs().max().item() for g in head_weights) > CLIP_AT:
            torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=CLIP_AT)
        stats.update(k_a=k[0], k_v=k[1], agm_t_a=self.train_scores[0], agm_t_v=self.train_scores[1])
        return stats

    def state_dict(self) -> dict:
        return {"train_scores": torch.tensor(self.train_scores, dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.train_scores = state["train_scores"].tolist()
