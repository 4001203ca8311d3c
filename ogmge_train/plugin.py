"""OGM-GE and every other balancing method of this build, in any training loop (README: Plug-in API).

    from ogmge_train.plugin import Balancer, Modalities, Output

    balancer = Balancer("ogm-ge", Modalities(model, {"audio": model.audio, "visual": model.visual}), alpha=0.8)
    ...
    loss.backward()
    balancer.after_backward(Output(logits, {"audio": logits_a, "visual": logits_v}), labels)
    optimizer.step()

Two ways to drive a method, one code path:

- **your loop** (``begin_epoch``, ``train_rows``, ``begin_step``, ``transform_inputs``,
  ``feature_hook``, ``loss``, ``after_backward``): you keep forward, backward and the optimizer
  step; call the hooks the method uses (``Balancer.required``; a missing one is a one-line
  ``ConfigError`` at ``after_backward``). Gradient accumulation: build with ``accumulation=n``
  and call ``after_backward`` once per optimizer step with the micro-batches' outputs joined
  (``Output.cat``); methods whose statistics are per forward pass refuse it.
- **the method runs the step** (``train_step``): forward, loss, backward, optimizer step, as many
  rounds as the method needs (alternating methods). ``ogmge_train.train`` trains this way.

Under DDP (``torch.distributed`` initialised) batch statistics are summed over ranks and the
noise generators are seeded by (seed, step), so every rank leaves the same gradients; build the
balancer before the DDP wrapper and the optimizer (methods with heads add them to the model).
With bf16 autocast nothing changes; with fp16 and a ``GradScaler`` call
``scaler.unscale_(optimizer)`` before ``after_backward`` (mmpareto and ``ge_noise="paper"`` take
gradients of the unscaled loss themselves: prefer bf16 there).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from . import modulation
from .errors import ConfigError
from .modalities import AUX, Modalities, Output
from .modulation.base import EpochStart, Method, Step, StepResult, StepRun, check_modalities, keep_rows, step_generator
from .modulation.none import NoModulation
from .names import METHODS

__all__ = ["METHODS", "Balancer", "Modalities", "Output"]

# what each hook is for, in the words of the error a loop of one's own gets when it skips one
_HOW = {
    "begin_epoch": "call balancer.begin_epoch(epoch, ...) before each epoch",
    "train_rows": "call rows = balancer.train_rows(keys) and train on those rows only",
    "begin_step": "call balancer.begin_step(labels, inputs) before the forward pass",
    "transform_inputs": "run the forward on balancer.transform_inputs(inputs)",
    "transform_features": "pass balancer.feature_hook() to your forward (it changes the features before fusion)",
    "loss": "back-propagate loss = balancer.loss(out, labels) (it adds its own terms)",
    "transform_stage": "pass balancer.feature_hook() to your forward (its stage attribute runs between encoder "
                       "stages) and balancer.eval_hook() to evaluation forwards",
}
_PER_STEP = ("train_rows", "begin_step", "transform_inputs", "transform_features", "transform_stage", "loss")


def _all_reduce() -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, int]:
    """A sum over ranks (None in one process) and this process's rank."""
    d = torch.distributed
    if d.is_available() and d.is_initialized() and d.get_world_size() > 1:
        def reduce(t: torch.Tensor) -> torch.Tensor:
            d.all_reduce(t, op=d.ReduceOp.SUM)
            return t
        return reduce, d.get_rank()
    return None, 0


class Balancer:
    """One balancing method, driven by any training loop.

    ``method``: a name of ``ogmge_train.names.METHODS`` (built with ``options``: ``alpha`` for
    the methods that scale gradients, ``start_epoch``/``end_epoch`` for when they act (default:
    every epoch), the method's own options, e.g. ``drop_p``, ``pmr_alpha``, ``ge_noise``) or a
    ``Method`` instance (your own). ``modalities``: the model side (``Modalities``); a model
    with one modality is trained plainly (there is nothing to balance). ``seed``: seeds the
    per-step noise generators (the same on every rank). ``accumulation``: micro-batches per
    optimizer step in your loop. ``fusion``: one of our fusion heads, for the methods limited
    to some (OPM: concat, sum).

    Cost (per optimizer step, besides your forward/backward): ogm/ge/ogm-ge one softmax over the
    unimodal logits and a pass over the modulated gradients (GE code noise: one normal draw per
    modulated weight, into a reused buffer; ``ge_noise="paper"``: one extra backward pass, see
    BENCHMARKS.md); agm three extra forward passes; mmpareto two extra backward passes per
    modality; pmr and gradient-blending passes over training batches at epoch starts
    (gradient-blending: M + 1 copies of the model trained for a super-epoch).
    """

    def __init__(self, method: str | Method, modalities: Modalities, *, seed: int = 0, accumulation: int = 1,
                 fusion: str | None = None, alpha: float | None = None, **options):
        if isinstance(method, str):
            cls = modulation.METHODS.get(method)
            if cls is not None and cls.scales and alpha is None and len(modalities.names) > 1:
                raise ConfigError(f"{method} scales gradients by 1 - tanh(alpha * rho): give alpha= "
                                  "(the paper: 0.8 CREMA-D, 0.1 VGGSound)")
            method = modulation.build(method, alpha=0.0 if alpha is None else alpha, fusion=fusion, **options)
        elif options or alpha is not None:
            raise ConfigError("options go to the method's constructor when you pass a Method instance")
        if accumulation < 1:
            raise ConfigError(f"accumulation must be >= 1, not {accumulation}")
        self.name = method.name
        if len(modalities.names) < 2:
            method = NoModulation()
        try:
            check_modalities(method, modalities)
            modules = method.setup(modalities)
        except ValueError as e:
            raise ConfigError(f"{method.name}: {e}") from None
        if accumulation > 1 and not method.accumulates():
            raise ConfigError(f"{method.name} does not work with gradient accumulation (its statistics are "
                              "those of one forward pass); use accumulation=1")
        if modules is not None:
            if hasattr(modalities.model, AUX):
                raise ConfigError(f"{method.name} adds its heads as model.{AUX}, which the model already has")
            like = next(modalities.model.parameters())
            modalities.model.add_module(AUX, modules.to(device=like.device, dtype=like.dtype))
        self.method, self.modalities = method, modalities
        self.seed, self.accumulation = seed, accumulation
        self.epoch, self.step = 0, 0
        self._began = False
        self._open: Step | None = None
        self._called: set[str] = set()
        self._weight = 1.0

    def __repr__(self):
        return f"Balancer({self.method!r}, {self.modalities!r})"

    @property
    def required(self) -> tuple[str, ...]:
        """The hooks a loop of one's own must call for this method (``after_backward`` always)."""
        if self.method.uses("train_step"):
            return ("train_step",)
        return (*(h for h in ("begin_epoch", *_PER_STEP) if self._needs(h)), "after_backward")

    def _needs(self, hook: str) -> bool:
        """Whether a loop of one's own must call ``hook`` (begin_step also for methods reading inputs)."""
        return self.method.uses(hook) or (hook == "begin_step" and "inputs" in self.method.needs)

    # -- epochs

    def begin_epoch(self, epoch: int, *, steps: int | None = None, batches=None, keyed_batches=None,
                    make_optimizer=None, epochs: int | None = None, on_event: Callable[[dict], None] | None = None
                    ) -> None:
        """Before training epoch ``epoch`` (counted from 0; the method acts in its
        ``start_epoch..end_epoch``). ``batches(n)`` (up to n training batches ``(inputs, labels)``),
        ``keyed_batches(e)`` (every batch of epoch e's order as ``(inputs, labels, keys)``),
        ``make_optimizer(params)``, ``steps`` (batches per epoch) and ``epochs`` (the run's) are
        needed by the methods that look at data before an epoch (pmr, gradient-blending);
        ``on_event`` receives their progress (``method_progress`` events)."""
        reduce, rank = _all_reduce()
        self.epoch, self._began = epoch, True
        self.method.begin_epoch(EpochStart(self.modalities, epoch, steps, batches, reduce, keyed_batches,
                                           make_optimizer, epochs, on_event or (lambda e: None), self.seed, rank))

    # -- your loop, per step

    def train_rows(self, keys: list[str]) -> torch.Tensor | None:
        """The rows of the batch to train on (None: all); slice inputs and labels with it before
        ``begin_step``. A batch with none gets one row and loss weight 0 (DDP ranks stay in step)."""
        self._refuse_own_steps()
        self._called.add("train_rows")
        rows = self.method.train_rows(keys)
        if rows is None:
            self._weight = 1.0
            return None
        rows, self._weight = keep_rows(rows)
        return rows

    def begin_step(self, labels: torch.Tensor, inputs: dict[str, torch.Tensor] | None = None) -> Step:
        """Opens a step (closed by ``after_backward``); ``inputs`` by modality, for methods that run
        the model on the batch themselves (agm)."""
        self._refuse_own_steps()
        self._open = self._new_step(labels, inputs, self._weight)
        self._called.add("begin_step")
        self.method.begin_step(self._open)
        return self._open

    def transform_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        step = self._require_open("transform_inputs")
        self._called.add("transform_inputs")
        return self.method.transform_inputs(inputs, training=True, step=step)

    def feature_hook(self) -> Callable[[dict], dict] | None:
        """A function (features by modality -> features) for your forward to apply before fusion,
        or None when the method leaves features alone."""
        step = self._require_open("feature_hook")
        self._called.update(("transform_features", "transform_stage"))
        return self.method.feature_hook(True, step)

    def loss(self, out: Output, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The method's training loss for ``out`` (cross-entropy of the fused logits plus its terms)."""
        step = self._step_for(labels, "loss")
        self._check_inputs(step)
        self._called.add("loss")
        loss = self.method.loss(out, step) + out.loss_terms(step.labels)
        return loss * step.weight if step.weight != 1.0 else loss

    def after_backward(self, out: Output, labels: torch.Tensor | None = None) -> dict[str, float]:
        """Between ``loss.backward()`` and ``optimizer.step()``: the method's gradient surgery.
        Returns the step's statistics (``rho_<tag>``, ``k_<tag>`` and the method's own)."""
        step = self._step_for(labels, "after_backward")
        if self.method.uses("begin_epoch") and not self._began:
            raise ConfigError(f"{self.name}: {_HOW['begin_epoch']}")
        self._check_inputs(step)
        missing = [h for h in _PER_STEP if self._needs(h) and h not in self._called]
        if missing:
            raise ConfigError(f"{self.name}: {_HOW[missing[0]]}")
        try:
            return self.method.after_backward(out, step)
        finally:
            self._close()

    # -- the method runs the step

    def train_step(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, optimizer: torch.optim.Optimizer, *,
                   keys: list[str] | None = None, model: torch.nn.Module | None = None, autocast=None,
                   on_backward: Callable[[torch.Tensor], bool] | None = None) -> StepResult | None:
        """One training step on a batch, run by the method: rows (``keys``), ``begin_step``, then
        ``Method.train_step`` (forward through ``model``, default the model itself; pass the DDP
        wrapper under DDP), under ``autocast()`` when given. ``on_backward(loss)`` runs after
        every backward (False: skip the step, e.g. a non-finite gradient; returns None).
        Needs ``Modalities(forward=...)``."""
        if self.accumulation > 1:
            raise ConfigError("train_step runs one optimizer step per batch; with gradient accumulation "
                              "call the hooks in your loop (after_backward once per optimizer step)")
        if not self.modalities.has("forward"):
            raise ConfigError("train_step runs the model: give Modalities(..., forward=...)")
        weight = 1.0
        if keys is None and (self.method.uses("train_rows") or "keys" in self.method.needs):
            raise ConfigError(f"{self.name} reads the samples' keys: give train_step(..., keys=...)")
        if self.method.uses("train_rows"):
            assert keys is not None
            mask = self.method.train_rows(keys)
            if mask is not None:
                rows, weight = keep_rows(mask)
                rows = rows.to(labels.device)
                inputs, labels = {u: x[rows] for u, x in inputs.items()}, labels[rows]
                keys = [k for k, kept in zip(keys, rows.tolist()) if kept]
        step = dataclasses.replace(self._new_step(labels, inputs, weight), keys=keys)
        self.method.begin_step(step)
        result = self.method.train_step(step, StepRun(step, optimizer, model, autocast, on_backward))
        if result is not None:
            self.step += 1
        return result

    # -- evaluation and state

    def eval_hook(self) -> Callable[[dict], dict] | None:
        """The feature hook of an evaluation forward (a mid-fusion method's layers), or None."""
        return self.method.feature_hook(False, None) if self.method.uses("transform_stage") else None

    def predict(self, out: Output) -> torch.Tensor:
        """The fused logits of an evaluation forward (the method's test-time fusion rule, if any)."""
        return self.method.fuse(out, self.modalities)

    def evaluate(self, out: Output) -> Output:
        """An evaluation forward as the method reads it: ``predict``'s fused logits and each
        modality's logits (the method's own heads' where it has them)."""
        return Output(self.predict(out), self.method.unimodal(out, self.modalities), out.features)

    def state_dict(self) -> dict:
        return {"method": self.method.state_dict(), "step": self.step, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state.get("method", {}))
        self.step, self.epoch = int(state.get("step", 0)), int(state.get("epoch", 0))

    # -- internals

    def _new_step(self, labels, inputs, weight: float = 1.0) -> Step:
        reduce, rank = _all_reduce()
        return Step(self.modalities, labels, self.epoch, reduce, step_generator(self.seed, self.step, labels.device),
                    inputs, self.step, self.seed, rank, weight)

    def _check_inputs(self, step: Step) -> None:
        if "inputs" in self.method.needs and step.inputs is None:
            self._close(count=False)
            raise ConfigError(f"{self.name}: {_HOW['begin_step']} (it runs the model on the inputs)")

    def _refuse_own_steps(self) -> None:
        if self.method.uses("train_step"):
            raise ConfigError(f"{self.name} runs several forward/backward/optimizer rounds per batch: "
                              "call balancer.train_step(inputs, labels, optimizer) instead of the hooks")

    def _require_open(self, what: str) -> Step:
        if self._open is None:
            raise ConfigError(f"{self.name}: call balancer.begin_step(labels, inputs) before {what}()")
        return self._open

    def _step_for(self, labels, what: str) -> Step:
        self._refuse_own_steps()
        if self._open is None:
            if labels is None:
                raise ConfigError(f"{what}() needs the batch's labels (or call begin_step first)")
            self._open = self._new_step(labels, None, self._weight)
        if labels is not None and labels is not self._open.labels:
            return dataclasses.replace(self._open, labels=labels)   # e.g. micro-batches joined for one update
        return self._open

    def _close(self, count: bool = True) -> None:
        self._open, self._called, self._weight = None, set(), 1.0
        self.step += count
