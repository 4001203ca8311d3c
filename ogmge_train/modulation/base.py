"""The modulation contract (ARCHITECTURE.md, "Modulation contract") and the OGM-GE arithmetic shared
by its variants.

A method sees the model only through ``Modalities`` (ogmge_train/modalities.py) and a forward
pass only as an ``Output``: modalities are named by key, so the methods whose definitions extend
to more than two modalities work on them unchanged.

Paper eqs. 8-10 and 16, for modalities u = 1..M (M = 2 in the paper):
``s_u = sum_i softmax(unimodal_u_i)[y_i]``, ``rho_u = s_u / mean_{w != u} s_w`` (for two
modalities ``rho_v = s_v / s_a``, ``rho_a = 1 / rho_v``, the paper's definition),
``k_u = 1 - tanh(alpha * rho_u)`` if ``rho_u > 1`` else 1; OGM scales modality u's modulated
gradients by ``k_u``; GE then adds noise to them: ``--ge-noise code`` ``N(0, std(g))`` per tensor
(the official code), ``paper`` noise with the mini-batch gradient covariance of eq. 13 (``PaperNoise``).
With more modalities a modality is slowed when it scores above the mean of the others; several
can be slowed at once, and the weakest never is.

Everything stays on the device as tensors (no per-sample Python loop, no ``.item()``); the only
host sync is the single ``tolist()`` that turns the step's statistics into floats, issued
after all gradient work has been queued.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..modalities import Modalities, Output
from ..names import GE_NOISES

STAT_KEYS = ("rho_a", "rho_v", "k_a", "k_v")      # our audio-visual trainer's names (metrics.jsonl)
UNIT_STATS = {"rho_a": 1.0, "rho_v": 1.0, "k_a": 1.0, "k_v": 1.0}


def stat_keys(modalities: Modalities) -> tuple[str, ...]:
    """``rho_<tag>`` for every modality, then ``k_<tag>`` (audio/visual: rho_a, rho_v, k_a, k_v)."""
    tags = [modalities.tags[u] for u in modalities.names]
    return (*(f"rho_{t}" for t in tags), *(f"k_{t}" for t in tags))


def unit_stats(modalities: Modalities) -> dict[str, float]:
    return dict.fromkeys(stat_keys(modalities), 1.0)


def step_generator(seed: int, step: int, device: torch.device, *extra: int) -> torch.Generator:
    """The generator of one optimizer step: the same on every rank for the same ``extra``, new per step."""
    s = np.random.SeedSequence([seed, step, *extra]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(s[0]) << 32 | int(s[1]))


class _RunView:
    """What Step and EpochStart both offer: the model behind ``modalities`` and a sum over ranks."""

    modalities: Modalities
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None

    @property
    def model(self) -> nn.Module:
        return self.modalities.model

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over ranks, in place (``all_reduce`` may return None, as torch's does)."""
        if self.all_reduce is not None:
            self.all_reduce(t)
        return t


@dataclass
class Step(_RunView):
    """What a method sees of one training step (built by ``Balancer`` before the forward pass).

    ``modalities``: the model side (``step.model`` is the module, unwrapped from DDP);
    ``all_reduce(t)`` sums a tensor over ranks in place (None in one process); ``generator``:
    seeded identically on every rank, new per step (GE's noise); ``local_generator``: new per
    step and different on every rank (per-sample draws); ``inputs``: the batch's inputs by
    modality (for methods that evaluate the model on variants); ``step``: steps taken before
    this one; ``weight``: the loss weight (0 for a batch with no sample to train on, see
    ``keep_rows``); ``keys``: the batch's sample keys (``train_step(..., keys=)``; methods that
    need them declare ``needs = (..., "keys")``).
    """

    modalities: Modalities
    labels: torch.Tensor
    epoch: int
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    generator: torch.Generator | None = None
    inputs: dict[str, torch.Tensor] | None = None
    step: int = 0
    seed: int = 0
    rank: int = 0
    weight: float = 1.0
    keys: list[str] | None = None

    @functools.cached_property
    def local_generator(self) -> torch.Generator:
        return step_generator(self.seed, self.step, self.labels.device, self.rank, 1)

    def forward(self, inputs: dict | None = None, hook=None) -> Output:
        """An extra evaluation of the (unwrapped) model, e.g. on a variant of the batch."""
        chosen = self.inputs if inputs is None else inputs
        assert chosen is not None, "this step has no inputs"
        return self.modalities.run(chosen, hook)


@dataclass
class EpochStart(_RunView):
    """What a method sees before a training epoch: ``batches(n)`` yields up to n training batches
    ``(inputs, labels)`` on the device (this rank's part, the epoch's order);
    ``keyed_batches(loader_epoch)`` yields every training batch of that epoch's order as
    ``(inputs, labels, keys)``; ``make_optimizer(params)`` builds the run's optimizer kind (same
    lr and weight decay) for a method's own copies of the model; ``epochs``: the run's number of
    epochs (None when open-ended); ``emit(event)``: progress events for the caller's display
    (``{"event": "method_progress", ...}``, see ``progress_event``); ``seed`` (the balancer's) and
    ``rank`` seed an epoch's draws (the same on every rank with ``rank`` left out)."""

    modalities: Modalities
    epoch: int
    steps: int | None = None
    batches: Callable[[int], Iterable[tuple[dict, torch.Tensor]]] | None = None
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    keyed_batches: Callable[[int], Iterable[tuple[dict, torch.Tensor, list]]] | None = None
    make_optimizer: Callable[[list], torch.optim.Optimizer] | None = None
    epochs: int | None = None
    emit: Callable[[dict], None] = field(default=lambda e: None)
    seed: int = 0
    rank: int = 0


def progress_event(method: str, task: str, done: int, total: int, started: float, now: float) -> dict:
    """A ``method_progress`` event: ``done`` of ``total`` units of ``task``, with an ETA from the mean rate."""
    rate = done / (now - started) if now > started and done else 0.0
    return {"event": "method_progress", "method": method, "task": task, "done": done, "total": total,
            "eta_s": (total - done) / rate if rate else None}


@dataclass
class StepResult:
    """One training step: the output of its (last) forward, its loss, the method's statistics,
    the labels it trained on and how many optimizer updates it made."""

    out: Output
    loss: torch.Tensor
    stats: dict[str, float]
    labels: torch.Tensor
    updates: int = 1


class StepRun:
    """How ``Method.train_step`` runs the model and the optimizer (built by ``Balancer.train_step``).

    ``forward(inputs=None, hook=None)`` runs the training module (the DDP wrapper under DDP) under
    the caller's autocast; ``backward(loss)`` zeroes the gradients, back-propagates and runs the
    caller's check (False: skip the rest of this step; the gradients are zeroed);
    ``update()`` takes one optimizer step. Several forward/backward/update rounds per batch are
    allowed (alternating methods); under DDP every backward must reach every parameter (DDP's
    ``find_unused_parameters`` is off): zero a modality's features instead of skipping its encoder.
    """

    def __init__(self, step: Step, optimizer, module: nn.Module | None = None, autocast=None, on_backward=None):
        self.step, self.optimizer = step, optimizer
        self.module = module
        self.autocast = autocast or contextlib.nullcontext
        self.on_backward = on_backward
        self.updates = 0

    def forward(self, inputs: dict | None = None, hook=None) -> Output:
        chosen = self.step.inputs if inputs is None else inputs
        assert chosen is not None, "this step has no inputs"
        with self.autocast():
            return self.step.modalities.run(chosen, hook, model=self.module)

    def backward(self, loss: torch.Tensor) -> bool:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ok = self.on_backward(loss) if self.on_backward is not None else True
        if not ok:
            self.optimizer.zero_grad(set_to_none=True)
        return ok

    def update(self) -> None:
        self.optimizer.step()
        self.updates += 1


def keep_rows(rows: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``rows`` and loss weight 1, or, for a batch without training samples, its first sample with
    weight 0 (every rank must still run the step: DDP and the gradient all-reduce expect it)."""
    if bool(rows.any()):
        return rows, 1.0
    rows = rows.clone()
    rows[0] = True
    return rows, 0.0


@torch.no_grad()
def unimodal_scores(unimodal: dict[str, torch.Tensor], names: Iterable[str], labels: torch.Tensor) -> torch.Tensor:
    """``[s_u for u in names]`` (float64, detached): summed softmax probability of the true class."""
    logits = torch.stack([unimodal[u].detach() for u in names]).float()      # (M, B, C)
    probs = logits.softmax(dim=2)
    index = labels.to(probs.device).view(1, -1, 1).expand(logits.shape[0], -1, 1)
    return probs.gather(2, index).squeeze(2).double().sum(dim=1)


def discrepancy(scores: torch.Tensor) -> torch.Tensor:
    """``rho_u = s_u / mean_{w != u} s_w`` for ``scores = [s_1..s_M]`` (M >= 2). The mean of the
    others is a masked sum, not ``(S - s_u) / (M - 1)``, so for two modalities it is the other's
    score exactly."""
    m = scores.shape[0]
    others = (torch.ones(m, m, dtype=scores.dtype, device=scores.device)
              - torch.eye(m, dtype=scores.dtype, device=scores.device)) @ scores / (m - 1)
    return scores / others


def coefficients(scores: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``rho`` and ``k`` (one per modality) from ``scores = [s_1..s_M]`` (tensors)."""
    rho = discrepancy(scores)
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


class PaperNoise:
    """GE noise with the covariance of eq. 13 (``--ge-noise paper``), without per-sample gradients.

    With per-sample losses ``l_i`` of the global batch of M samples, their gradients ``g_i`` and
    the batch gradient ``gbar = 1/M sum_i g_i`` (what backward leaves, DDP-averaged), draw
    ``z_i ~ N(0, 1)`` per sample and take

        ``h = c (grad(1/M sum_i z_i l_i) - (1/M sum_i z_i) gbar) = c/M sum_i z_i (g_i - gbar)``,

    so ``Cov(h | batch) = c^2/M^2 sum_i (g_i - gbar)(g_i - gbar)^T``. With ``c^2 = M / (M - 1)``
    that is ``S / M``, S the unbiased sample covariance of the per-sample gradients: an unbiased
    estimate of ``Sigma_sgd = Sigma / M`` (Sigma the covariance of one sample's gradient over the
    data), shrinking as 1/M. With BatchNorm in training mode the ``l_i`` are coupled through the
    batch statistics; ``g_i`` is then the gradient of sample i's term of the batch loss (batch
    statistics differentiated too), and still ``gbar = 1/M sum_i g_i`` exactly.

    Cost: one extra backward pass (of ``sum_i z_i l_i`` down to the modulated parameters, keeping
    the graph for the main backward) and one gradient-sized buffer; under DDP one all-reduce of
    that buffer. ``z`` is drawn per rank (``Step.local_generator``: reproducible, different per
    rank), ``sum z_i`` and the sample count are all-reduced with the gradient.
    """

    def __init__(self):
        self.pending: tuple[list[torch.Tensor], torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def draw(n: int, step: Step) -> torch.Tensor:
        """``z``: one standard normal per sample of this rank (reproducible, different per rank)."""
        g = step.local_generator
        return torch.randn(n, generator=g, device=g.device, dtype=torch.float32)

    def prepare(self, per_sample: torch.Tensor, params: Sequence[torch.Tensor], step: Step) -> None:
        """Before the main backward: the z-weighted gradients of the per-sample losses."""
        z = self.draw(per_sample.shape[0], step).to(per_sample.device)
        grads = torch.autograd.grad((z * per_sample).sum(), params, retain_graph=True, allow_unused=True)
        flat = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        vec = torch.cat([*(g.flatten() for g in flat),
                         torch.stack([z.sum(), z.new_tensor(float(per_sample.shape[0]))])])
        vec = step.reduce(vec)
        total = vec[-1]
        u = list((vec[:-2] / total).split([g.numel() for g in flat]))
        self.pending = ([v.view_as(g) for v, g in zip(u, flat)], vec[-2] / total, total)

    @torch.no_grad()
    def apply(self, params: Sequence[torch.Tensor], scales: Sequence[torch.Tensor | None]) -> None:
        """After the main backward: ``g <- scale * g + h`` for each parameter of ``prepare``."""
        if self.pending is None:
            raise RuntimeError("--ge-noise paper: the step's loss did not come from the method's loss hook")
        u, zbar, total = self.pending
        self.pending = None
        c = torch.sqrt(total / (total - 1).clamp(min=1.0)).float()     # one sample: h is 0 anyway
        for p, up, k in zip(params, u, scales):
            if p.grad is None:
                continue
            h = (up - zbar.to(up.dtype) * p.grad) * c
            if k is not None:
                p.grad.mul_(k)
            p.grad.add_(h)


class Method:
    """A training-time intervention. The loop calls, per epoch and step (ARCHITECTURE.md,
    "Modulation contract"):

    ``setup(modalities)`` once, before training: check the model side, make the method's own
    modules (returned trainable modules are added to the model, see ``setup``);
    ``begin_epoch(EpochStart)`` before the epoch's first step (e.g. PMR's prototypes);
    ``train_rows(keys)`` which samples of the batch to train on;
    ``begin_step(Step)`` before each training forward pass;
    ``train_step(Step, StepRun)`` the step itself; the default runs the hooks below once
    (forward on ``transform_inputs`` with ``feature_hook``, ``loss``, backward,
    ``after_backward``, optimizer step); alternating methods override it with several rounds;
    ``transform_inputs(inputs, training, step)`` replaces the inputs of the training forward;
    ``transform_features(features, training, step)`` replaces the pooled features before fusion;
    ``loss(out, step)`` -> the scalar to back-propagate (default: cross-entropy of the fused logits);
    ``after_backward(out, step)`` between backward and the optimizer step (gradient surgery) -> stats;
    ``fuse(out, modalities)`` the fused logits at evaluation (default ``out.logits``);
    ``unimodal(out, modalities)`` each modality's logits at evaluation (default ``out.unimodal``);
    ``state_dict()`` / ``load_state_dict()``: what must survive ``--resume``.

    Class attributes: ``fusions`` (our fusion heads it works with; None: all), ``options``
    (TrainConfig fields it takes), ``max_modalities`` (None: any number >= 2), ``needs`` (parts of
    ``Modalities`` it uses beyond the parameters: forward, unimodal, head, num_classes, dims; and
    ``inputs`` when it reads ``step.inputs``, so a loop of one's own must pass them to ``begin_step``;
    ``keys`` when it reads ``step.keys``, given to ``train_step``),
    ``accumulation`` (whether it works with gradient accumulation: one ``after_backward`` on the
    micro-batches' concatenated outputs).

    ``alpha``: OGM strength; active in epochs ``start_epoch..end_epoch`` (inclusive, counted as the
    training loop counts them); ``ge_noise``: GE's noise, ``code`` or ``paper`` (module docstring).
    """

    name = "none"
    scales = False   # OGM: multiply by k_u
    noise = False    # GE: add noise
    fusions: tuple[str, ...] | None = None
    options: tuple[str, ...] = ()
    max_modalities: int | None = None
    needs: tuple[str, ...] = ()
    accumulation = True

    def __init__(self, *, alpha: float = 0.0, start_epoch: int = 0, end_epoch: int | None = None,
                 ge_noise: str = "code"):
        if ge_noise not in GE_NOISES:
            raise ValueError(f"ge_noise must be one of {', '.join(GE_NOISES)}, not {ge_noise!r}")
        self.alpha, self.start_epoch, self.end_epoch = float(alpha), start_epoch, end_epoch
        self.ge_noise = ge_noise
        self._noise = NoiseBuffer()
        self._paper = PaperNoise()

    def __repr__(self):
        return (f"{type(self).__name__}(alpha={self.alpha}, start_epoch={self.start_epoch}, "
                f"end_epoch={self.end_epoch})")

    def active(self, epoch: int) -> bool:
        return self.start_epoch <= epoch and (self.end_epoch is None or epoch <= self.end_epoch)

    def uses(self, hook: str) -> bool:
        """Whether this method does something in ``hook`` (what a loop of one's own must call)."""
        if hook == "loss" and self._paper_noise():
            return True
        return getattr(type(self), hook) is not getattr(Method, hook)

    def accumulates(self) -> bool:
        return self.accumulation and not self._paper_noise()

    def _paper_noise(self) -> bool:
        return self.noise and self.ge_noise == "paper"

    # -- once

    def setup(self, modalities: Modalities) -> nn.Module | None:
        """Called once, before training, with the model side. Returns the trainable modules this
        method adds to the model (e.g. a classifier per modality), or None: they are attached to
        the model as ``model.aux_heads`` before the optimizer and DDP are built, so they are
        ordinary parameters (optimizer, DDP, checkpoints); reach them through
        ``modalities.aux``, which for a copy of the model (``Modalities.copy``) is the copy's.
        Frozen modules (teachers) stay in the method, in eval mode with ``requires_grad=False``,
        saved in ``state_dict``, or, loaded from files, recorded there by path and hash (umt)."""
        return None

    # -- per epoch and step

    def begin_epoch(self, start: EpochStart) -> None:
        """Before training epoch ``start.epoch`` (also the first epoch after a resume)."""

    def train_rows(self, keys: list[str]) -> torch.Tensor | None:
        """Which samples of a training batch to train on (a bool mask), None for all of them;
        methods that hold out part of train (gradient-blending) exclude it here."""
        return None

    def begin_step(self, step: Step) -> None:
        """Before the training forward pass of a step (e.g. AGM's extra evaluations, which must
        see BatchNorm statistics before this batch updates them)."""

    def transform_inputs(self, inputs: dict[str, torch.Tensor], *, training: bool,
                         step: Step | None = None) -> dict[str, torch.Tensor]:
        """The inputs the training forward runs on (e.g. a modality dropped at the input)."""
        return inputs

    def transform_features(self, features: dict[str, torch.Tensor], *, training: bool,
                           step: Step | None = None) -> dict[str, torch.Tensor]:
        return features

    def transform_stage(self, i: int, maps: dict[str, torch.Tensor], *, training: bool,
                        step: Step | None = None) -> dict[str, torch.Tensor]:
        """The encoders' feature maps after stage i (mid-fusion; models with ``Modalities(stages=)``),
        in training and evaluation forwards alike."""
        return maps

    def feature_hook(self, training: bool, step: Step | None = None) -> Callable | None:
        """The forward's feature hook for this method, or None when it leaves features alone; with
        ``transform_stage`` in use it carries it as its ``stage(i, maps)`` attribute."""
        staged = self.uses("transform_stage")
        if not (self.uses("transform_features") or staged):
            return None
        return _Hook(self, training, step) if staged else \
            (lambda features: self.transform_features(features, training=training, step=step))

    def train_step(self, step: Step, run: StepRun) -> StepResult | None:
        """One training step (None when ``run.backward`` asked to skip it)."""
        inputs = self.transform_inputs(step.inputs, training=True, step=step) if step.inputs is not None else None
        out = run.forward(inputs, hook=self.feature_hook(True, step))
        loss = self.loss(out, step) + out.loss_terms(step.labels)
        if step.weight != 1.0:      # a batch with no sample to train on (see keep_rows)
            loss = loss * step.weight
        if not run.backward(loss):
            return None
        stats = self.after_backward(out, step)
        run.update()
        return StepResult(out, loss, stats, step.labels, run.updates)

    def loss(self, out: Output, step: Step) -> torch.Tensor:
        """The training loss of one step; methods with auxiliary losses add them here."""
        if self._paper_noise() and self.active(step.epoch) and len(step.modalities.names) > 1:
            per_sample = F.cross_entropy(out.logits.float(), step.labels, reduction="none")
            params = [p for u in step.modalities.names for p in step.modalities.modulated(u)]
            self._paper.prepare(per_sample, params, step)
            return per_sample.mean()
        return F.cross_entropy(out.logits.float(), step.labels)

    def after_backward(self, out: Output, step: Step) -> dict[str, float]:
        """Between ``loss.backward()`` and ``optimizer.step()``: modulate encoder gradients.

        Returns ``rho_<tag>`` and ``k_<tag>`` per modality. rho is measured in every step (also
        for ``none`` and outside the active epochs, so runs can be compared on it); k is 1.0 unless
        this method scales in an active epoch. Under DDP ``step.all_reduce`` sums the scores over
        ranks in place, so every rank uses the same k; ``step.generator`` (seeded identically on
        every rank) draws the code noise.
        """
        m = step.modalities
        if len(m.names) < 2:
            return unit_stats(m)
        scores = step.reduce(unimodal_scores(out.unimodal, m.names, step.labels))
        rho, k = coefficients(scores, self.alpha)
        on = (self.scales or self.noise) and self.active(step.epoch)
        if on:
            with torch.no_grad():
                params, scales, k_f = [], [], k.float()
                for i, u in enumerate(m.names):
                    for p in m.modulated(u):
                        params.append(p)
                        scales.append(k_f[i] if self.scales else None)
                if self.noise and self.ge_noise == "paper":
                    self._paper.apply(params, scales)
                else:
                    live = [(p.grad, s) for p, s in zip(params, scales) if p.grad is not None]
                    modulate([g for g, _ in live], [s for _, s in live], self.noise, step.generator, self._noise)
        if not (on and self.scales):
            k = torch.ones_like(k)
        return dict(zip(stat_keys(m), torch.cat([rho, k]).tolist()))

    def fuse(self, out: Output, modalities: Modalities) -> torch.Tensor:
        """The fused logits of an evaluation forward (a method's own fusion rule at test time)."""
        return out.logits

    def unimodal(self, out: Output, modalities: Modalities) -> dict[str, torch.Tensor]:
        """Each modality's own logits of an evaluation forward (what reports call acc_a, acc_v):
        the model's by default; a method that classifies each modality with heads of its own
        (``setup``) gives those."""
        return out.unimodal

    def state_dict(self) -> dict:
        """Tensors and primitives only (checkpoints load with ``weights_only=True``)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class _Hook:
    """A feature hook that also has ``stage(i, maps)`` (``Method.transform_stage``)."""

    def __init__(self, method: Method, training: bool, step: Step | None):
        self.method, self.training, self.step = method, training, step

    def __call__(self, features: dict) -> dict:
        return self.method.transform_features(features, training=self.training, step=self.step)

    def stage(self, i: int, maps: dict) -> dict:
        return self.method.transform_stage(i, maps, training=self.training, step=self.step)


def linear_heads(modalities: Modalities, init: str = "xavier") -> nn.ModuleDict:
    """A linear classifier per modality on its pooled features (MMPareto, Gradient-Blending),
    initialised as the reference code initialises every Linear (``xavier``: xavier-normal weights,
    zero bias) or by PyTorch's default (``torch``)."""
    assert modalities.dims is not None and modalities.num_classes is not None
    linears = {u: nn.Linear(modalities.dims[u], modalities.num_classes) for u in modalities.names}
    if init == "xavier":
        for head in linears.values():
            nn.init.xavier_normal_(head.weight)
            nn.init.zeros_(head.bias)
    return nn.ModuleDict(linears)


def shared_head(modalities: Modalities, what: str, init: str = "xavier") -> nn.Linear:
    """One linear classifier for the features of every modality (MLA, ReconBoost): they need one
    width (ValueError naming ``what`` otherwise); ``xavier`` init as ``linear_heads``."""
    assert modalities.dims is not None and modalities.num_classes is not None
    widths = set(modalities.dims.values())
    if len(widths) > 1:
        raise ValueError(f"{what} is shared by every modality, so their features need one width, not "
                         f"{', '.join(f'{u} {d}' for u, d in modalities.dims.items())}")
    head = nn.Linear(widths.pop(), modalities.num_classes)
    if init == "xavier":
        nn.init.xavier_normal_(head.weight)
        nn.init.zeros_(head.bias)
    return head


def keep_grads(model: nn.Module, keep: Iterable[nn.Parameter]) -> None:
    """Every gradient of ``model`` outside ``keep`` set to None, so the optimizer step leaves those
    parameters alone (a round of an alternating method that reached them with zeros for DDP)."""
    kept = {id(p) for p in keep}
    for p in model.parameters():
        if id(p) not in kept:
            p.grad = None


def check_modalities(method: Method, modalities: Modalities) -> None:
    """Refuse a model side the method's definition does not cover (ValueError, one line)."""
    n = len(modalities.names)
    if n >= 2 and method.max_modalities is not None and n > method.max_modalities:
        raise ValueError(f"{method.name} is defined for {method.max_modalities} modalities, not {n} "
                         f"({', '.join(modalities.names)})")
    missing = [p for p in method.needs if p not in ("inputs", "keys") and not modalities.has(p)]
    if n >= 2 and missing:
        raise ValueError(f"{method.name} needs Modalities(..., {'=..., '.join(missing)}=...) "
                         f"({', '.join(_NEEDS[p] for p in missing)})")


_NEEDS = {"forward": "it runs the model itself", "unimodal": "it needs each modality's logits from its features",
          "head": "it reads the fusion head's gradients", "num_classes": "it adds a classifier per modality",
          "dims": "it needs each modality's feature width",
          "stages": "it inserts layers between encoder stages: the forward must call hook.stage(i, maps)"}
