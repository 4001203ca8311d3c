"""The modulation contract (ARCHITECTURE.md) and the OGM-GE arithmetic shared by its variants.

Paper eqs. 8-10 and 16, with u in {a, v}:
``s_u = sum_i softmax(logits_u_i)[y_i]``, ``rho_v = s_v / s_a``, ``rho_a = 1 / rho_v``,
``k_u = 1 - tanh(alpha * rho_u)`` if ``rho_u > 1`` else 1; OGM scales modality u's modulated
gradients by ``k_u``; GE adds ``N(0, std(g))`` per tensor, std of the unmodulated gradient.

Everything stays on the device as tensors (no per-sample Python loop, no ``.item()``); the only
host sync is the single ``tolist()`` that turns the step's four statistics into floats, issued
after all gradient work has been queued.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

STAT_KEYS = ("rho_a", "rho_v", "k_a", "k_v")
UNIT_STATS = {"rho_a": 1.0, "rho_v": 1.0, "k_a": 1.0, "k_v": 1.0}


@dataclass
class Step:
    """What a method sees of one training step (built by the loop before the forward pass).

    ``model``: the AVModel (unwrapped from DDP); ``all_reduce(t)`` sums a tensor over ranks in
    place (None in one process); ``generator``: seeded identically on every rank, new per step;
    ``audio``/``visual``: the batch's inputs (for methods that evaluate the model on variants);
    ``step``: optimizer steps taken before this one.
    """

    model: torch.nn.Module
    labels: torch.Tensor
    epoch: int
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    generator: torch.Generator | None = None
    audio: torch.Tensor | None = None
    visual: torch.Tensor | None = None
    step: int = 0

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(t) if self.all_reduce is not None else t


@dataclass
class EpochStart:
    """What a method sees before a training epoch: ``batches(n)`` yields up to n training batches
    ``(audio, visual, labels)`` on the device (this rank's part, the epoch's order);
    ``keyed_batches(loader_epoch)`` yields every training batch of that epoch's order as
    ``(audio, visual, labels, keys)``; ``make_optimizer(params)`` builds the run's optimizer kind
    (same lr and weight decay) for a method's own copies of the model."""

    model: torch.nn.Module
    epoch: int
    steps: int
    batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    keyed_batches: Callable[[int], Iterable[tuple]] | None = None
    make_optimizer: Callable[[list], torch.optim.Optimizer] | None = None

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(t) if self.all_reduce is not None else t


def _unwrap(model):
    """The AVModel inside a DistributedDataParallel (or similar) wrapper."""
    return getattr(model, "module", model)


@torch.no_grad()
def unimodal_scores(logits_a: torch.Tensor, logits_v: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[s_a, s_v]`` (float64, detached): summed softmax probability of the true class."""
    logits = torch.stack([logits_a.detach(), logits_v.detach()]).float()      # (2, B, C)
    probs = logits.softmax(dim=2)
    index = labels.to(probs.device).view(1, -1, 1).expand(2, -1, 1)
    return probs.gather(2, index).squeeze(2).double().sum(dim=1)


def coefficients(scores: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``rho = [rho_a, rho_v]`` and ``k = [k_a, k_v]`` from ``scores = [s_a, s_v]`` (tensors)."""
    rho_v = scores[1] / scores[0]
    rho = torch.stack([1 / rho_v, rho_v])
    k = torch.where(rho > 1, 1 - torch.tanh(alpha * rho), torch.ones_like(rho))
    return rho, k


class NoiseBuffer:
    """Standard normal noise for a list of gradients, drawn in one call into a reused flat buffer.

    One draw covers every tensor, in list order, so identical generators give identical noise on
    every rank. Reusing the buffer avoids allocating (and page-faulting) ~4 bytes per modulated
    parameter every step, which on CPU costs about as much as drawing the numbers; the price is
    that memory held between steps. The draw happens on the generator's device (without a generator:
    the gradients' device and its default generator); a CPU generator with CUDA gradients draws on
    the CPU and copies (correct, slower): give the loop a generator on the training device.
    """

    def __init__(self):
        self.buf: torch.Tensor | None = None

    def draw(self, grads: list[torch.Tensor], generator: torch.Generator | None) -> list[torch.Tensor]:
        total = sum(g.numel() for g in grads)
        device = grads[0].device if generator is None else generator.device
        buf = self.buf
        if buf is None or buf.numel() < total or buf.device != device or buf.dtype != grads[0].dtype:
            buf = self.buf = torch.empty(total, device=device, dtype=grads[0].dtype)
        flat = buf[:total].normal_(generator=generator).to(grads[0].device)
        return [z.view_as(g) for z, g in zip(flat.split([g.numel() for g in grads]), grads)]


@torch.no_grad()
def modulate(grads: list[torch.Tensor], scales: list[torch.Tensor | None], noise: bool,
             generator: torch.Generator | None = None, buffer: NoiseBuffer | None = None) -> None:
    """In place for each gradient: ``g <- scale * g`` (unless its scale is None), then, with
    ``noise``, ``+ std(g_before) * z`` with ``z`` standard normal (see ``NoiseBuffer``).

    The std is each tensor's own unbiased std before scaling (the reference code's ``grad.std()``);
    a one-element tensor has no spread and gets no noise.
    """
    if not grads:
        return
    if noise:
        stds = [g.std() if g.numel() > 1 else g.new_zeros(()) for g in grads]
        zs = (buffer or NoiseBuffer()).draw(grads, generator)
    for i, (g, k) in enumerate(zip(grads, scales)):
        if k is not None:
            g.mul_(k)  # a 0-dim tensor: no host sync, and g keeps its dtype
        if noise:
            g.addcmul_(zs[i], stds[i])


class Method:
    """A training-time intervention. The loop calls, per epoch and step (ARCHITECTURE.md,
    "Modulation contract"):

    ``begin_epoch(EpochStart)`` before the epoch's first step (e.g. PMR's prototypes);
    ``begin_step(Step)`` before each training forward pass;
    ``feature_hook(training, step)`` -> a function replacing the pooled features before fusion;
    ``loss(out, step)`` -> the scalar to back-propagate (default: cross-entropy of the fused logits);
    ``after_backward(...)`` between backward and the optimizer step (gradient surgery) -> stats;
    ``state_dict()`` / ``load_state_dict()``: what must survive ``--resume``.

    ``alpha``: OGM strength; active in epochs ``start_epoch..end_epoch`` (inclusive, counted as the
    training loop counts them); ``scope``: "conv" (encoders' conv weights) or "all" (every
    encoder parameter). ``fusions``: the fusion heads the method works with (None: all).
    """

    name = "none"
    scales = False   # OGM: multiply by k_u
    noise = False    # GE: add N(0, std(g))
    fusions: tuple[str, ...] | None = None

    def __init__(self, *, alpha: float = 0.0, start_epoch: int = 0, end_epoch: int | None = None,
                 scope: str = "conv"):
        if scope not in ("conv", "all"):
            raise ValueError(f"scope must be 'conv' or 'all', not {scope!r}")
        self.alpha, self.start_epoch, self.end_epoch, self.scope = float(alpha), start_epoch, end_epoch, scope
        self._noise = NoiseBuffer()

    def __repr__(self):
        return (f"{type(self).__name__}(alpha={self.alpha}, start_epoch={self.start_epoch}, "
                f"end_epoch={self.end_epoch}, scope={self.scope!r})")

    def active(self, epoch: int) -> bool:
        return self.start_epoch <= epoch and (self.end_epoch is None or epoch <= self.end_epoch)

    def begin_epoch(self, start: EpochStart) -> None:
        """Before training epoch ``start.epoch`` (also the first epoch after a resume)."""

    def transform_features(self, feat_a, feat_v, *, training: bool, step: Step | None = None):
        return feat_a, feat_v

    def feature_hook(self, training: bool, step: Step | None = None) -> Callable | None:
        """The model's ``feature_hook`` for this method, or None when it leaves features alone."""
        if type(self).transform_features is Method.transform_features:
            return None
        return lambda a, v: self.transform_features(a, v, training=training, step=step)

    def begin_step(self, step: Step) -> None:
        """Before the training forward pass of a step (e.g. AGM's extra evaluations, which must
        see BatchNorm statistics before this batch updates them)."""

    def train_rows(self, keys: list[str]) -> torch.Tensor | None:
        """Which samples of a training batch to train on (a bool mask), None for all of them;
        methods that hold out part of train (gradient-blending) exclude it here."""
        return None

    def loss(self, out, step: Step) -> torch.Tensor:
        """The training loss of one step; methods with auxiliary losses add them here."""
        return F.cross_entropy(out.logits.float(), step.labels)

    def state_dict(self) -> dict:
        """Tensors and primitives only (checkpoints load with ``weights_only=True``)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def after_backward(self, model, out, labels, *, epoch: int, all_reduce=None,
                       generator=None) -> dict[str, float]:
        """Between ``loss.backward()`` and ``optimizer.step()``: modulate encoder gradients.

        Returns ``rho_a, rho_v, k_a, k_v``. rho is measured in every step (also for ``none`` and
        outside the active epochs, so runs can be compared on it); k is 1.0 unless this method
        scales in an active epoch. A unimodal model (one of the logits is None) is left alone and
        reports 1.0 for all four. Under DDP ``all_reduce`` sums ``[s_a, s_v]`` over ranks in place,
        so every rank uses the same k; ``generator`` (seeded identically on every rank) draws the
        GE noise.
        """
        if out.logits_a is None or out.logits_v is None:
            return dict(UNIT_STATS)
        scores = unimodal_scores(out.logits_a, out.logits_v, labels)
        if all_reduce is not None:
            all_reduce(scores)
        rho, k = coefficients(scores, self.alpha)
        on = (self.scales or self.noise) and self.active(epoch)
        if on:
            net = _unwrap(model)
            grads, scales, k_f = [], [], k.float()
            for i, modality in enumerate(("audio", "visual")):
                for _, p in net.modulated_parameters(modality, self.scope):
                    if p.grad is not None:
                        grads.append(p.grad)
                        scales.append(k_f[i] if self.scales else None)
            modulate(grads, scales, self.noise, generator, self._noise)
        if not (on and self.scales):
            k = torch.ones_like(k)
        rho_a, rho_v, k_a, k_v = torch.cat([rho, k]).tolist()
        return {"rho_a": rho_a, "rho_v": rho_v, "k_a": k_a, "k_v": k_v}
