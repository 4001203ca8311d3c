"""``inforeg``: Information Acquisition Regulation (Huang, Wei, Yang, Hu, CVPR 2025), as its
official code (``main.py``, ``train_epoch``).

Defined for two modalities (the official code: audio and visual; here the model side's first and
second, audio and visual for ours). Loss: ``CE(fused) + CE(z_a) + CE(z_v)`` with ``z_u`` each
modality's own logits (README: Training; ``W_u u + b/2`` for concat, as the official code). Per
step, after backward:

- ``s_u = sum_i softmax(z_u)_i[y_i]`` (all-reduced under DDP: the sum over the global batch);
- inside the prime learning window (below) and the active epochs, the modality with the larger
  score is slowed by a proximal term towards its parameters at the start of the epoch,
  ``g <- g + beta_u (theta - theta_prev)`` for every parameter of its encoder, with
  ``beta_a = inforeg_beta_a * exp(tanh(s_a - s_v))`` when ``s_a > s_v`` and
  ``beta_v = inforeg_beta_v * exp(tanh(s_v - s_a))`` when ``s_v > s_a`` (0.95 and 0.1 in the
  official code);
- the Fisher-information trace of the audio (first) encoder accumulates,
  ``T += sum over its modulated weights of mean(g**2)`` (conv weights by default, as the official
  code; the gradient after the proximal term).

Prime learning window: from the epoch traces ``T_0, T_1, ...`` (ten zeros before the first, as the
official list starts), before epoch e ``k = (m_e - m'_e) / m_e`` with ``m_e`` the mean of the last
ten traces and ``m'_e`` the mean of the ten before the last one; the window is open while
``k > inforeg_window`` (0.05); k = 1 in epoch 0. The official code measures the information
acquisition of the audio encoder only (its information-sufficient modality), and so does this.
Every fusion. Step stats: ``beta_<tag>`` (``beta_a``, ``beta_v``; 0 when not regulating), ``inforeg_k``.
State: the traces and the running trace of the epoch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import EpochStart, Method, unimodal_scores

WINDOW_LEN = 10     # epochs in each mean of the information gain rate (official code)


def gain_rate(traces: list[float]) -> float:
    """The information gain rate k from the epoch traces so far (1.0 before two epochs)."""
    history = [0.0] * WINDOW_LEN + list(traces)
    now = sum(history[-WINDOW_LEN:]) / WINDOW_LEN
    before = sum(history[-WINDOW_LEN - 1:-1]) / WINDOW_LEN
    if not traces or now <= 0:
        return 1.0
    return (now - before) / now


class InfoReg(Method):
    name = "inforeg"
    options = ("inforeg_beta_a", "inforeg_beta_v", "inforeg_window")
    max_modalities = 2

    def __init__(self, *, inforeg_beta_a: float = 0.95, inforeg_beta_v: float = 0.1, inforeg_window: float = 0.05,
                 **kwargs):
        super().__init__(**kwargs)
        if inforeg_beta_a < 0 or inforeg_beta_v < 0:
            raise ValueError("inforeg_beta_a and inforeg_beta_v must be >= 0")
        self.beta0 = (float(inforeg_beta_a), float(inforeg_beta_v))
        self.threshold = float(inforeg_window)
        self.traces: list[float] = []
        self.running: float | None = None    # this epoch's trace so far (None before its first step)
        self.k = 1.0
        self._prev: dict[str, list[torch.Tensor]] = {}

    def begin_epoch(self, start: EpochStart) -> None:
        if self.running is not None:
            self.traces.append(self.running)
        self.running = None
        self.k = gain_rate(self.traces)
        m = start.modalities
        self._prev = {u: [p.detach().clone() for p in m.params(u)] for u in m.names}

    def window_open(self) -> bool:
        return self.k > self.threshold

    def loss(self, out, step):
        loss = F.cross_entropy(out.logits.float(), step.labels)
        for u in step.modalities.names:
            loss = loss + F.cross_entropy(out.unimodal[u].float(), step.labels)
        return loss

    def betas(self, scores: torch.Tensor, epoch: int) -> list[float]:
        """``[beta_a, beta_v]`` from ``scores = [s_a, s_v]`` (first and second modality)."""
        s_a, s_v = scores.tolist()
        if not (self.active(epoch) and self.window_open()) or s_a == s_v:
            return [0.0, 0.0]
        if s_a > s_v:
            return [self.beta0[0] * math.exp(math.tanh(s_a - s_v)), 0.0]
        return [0.0, self.beta0[1] * math.exp(math.tanh(s_v - s_a))]

    @torch.no_grad()
    def after_backward(self, out, step):
        stats = super().after_backward(out, step)
        m = step.modalities
        scores = step.reduce(unimodal_scores(out.unimodal, m.names, step.labels))
        betas = self.betas(scores, step.epoch)
        for beta, u in zip(betas, m.names):
            if beta and u in self._prev:
                for p, prev in zip(m.params(u), self._prev[u]):
                    if p.grad is not None:
                        p.grad.add_(p.detach() - prev.to(p.device), alpha=beta)
        grads = [p.grad for p in m.modulated(m.names[0]) if p.grad is not None]
        if grads:
            self.running = (self.running or 0.0) + float(torch.stack([g.double().pow(2).mean() for g in grads]).sum())
        return {**stats, **{f"beta_{m.tags[u]}": b for u, b in zip(m.names, betas)}, "inforeg_k": self.k}

    def state_dict(self) -> dict:
        state = {"traces": torch.tensor(self.traces, dtype=torch.float64)}
        if self.running is not None:
            state["running"] = torch.tensor(self.running, dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.traces = state["traces"].tolist()
            self.running = float(state["running"]) if "running" in state else None
