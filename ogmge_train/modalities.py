"""The model side of the plug-in API: what a balancing method may use of a model (README: Plug-in API).

``Output`` is what one forward pass gives a method: fused logits and, per modality (named by
key), unimodal logits (or any per-class scores) and pooled features. ``Modalities`` describes a
model: each modality's encoder parameters and, for methods that need them, a forward function,
a feature-to-logits function and the fusion head. Neither knows any method; our own ``AVModel``
builds one with ``AVModel.modalities()``, a researcher's model with a few lines.

Parameters are recorded by their names in the model, so ``copy()`` (a method training a copy of
the model, e.g. Gradient-Blending) finds the same groups in the copy.
"""
from __future__ import annotations

import copy as copy_module
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["AUX", "FeatureHook", "Modalities", "Output"]

# The attribute under which a method's own trainable modules (heads) are added to the model, so the
# model's optimizer, DDP wrapper and state_dict carry them (Method.setup).
AUX = "aux_heads"

FeatureHook = Callable[[dict], dict]


@dataclass
class Output:
    """One forward pass, as methods see it.

    ``logits``: fused logits (B, C). ``unimodal``: modality -> that modality's own logits or
    scores (B, C) (what OGM's discrepancy ratio reads). ``features``: modality -> pooled features
    (B, D_u) (PMR's prototypes, the heads of MMPareto and Gradient-Blending, OPM's drop).
    A modality missing from a dict is simply absent (e.g. a unimodal model).
    ``model_loss``: the model's own training terms as a function of the labels (PSP's
    audio-visual pair similarity loss), added to every method's loss (``loss_terms``); None for
    most models.
    """

    logits: torch.Tensor
    unimodal: dict[str, torch.Tensor] = field(default_factory=dict)
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    model_loss: Callable[[torch.Tensor], torch.Tensor] | None = None

    def loss_terms(self, labels: torch.Tensor) -> torch.Tensor | float:
        """The model's own loss terms for ``labels`` (0 when it has none)."""
        return 0.0 if self.model_loss is None else self.model_loss(labels)

    @classmethod
    def cat(cls, outputs: Iterable[Output]) -> Output:
        """The outputs of several micro-batches as one batch (gradient accumulation: one
        ``after_backward`` per optimizer step). Every tensor is detached: only statistics are
        read from it."""
        outs = list(outputs)
        if not outs:
            raise ValueError("Output.cat needs at least one output")

        def join(dicts):
            return {k: torch.cat([d[k].detach() for d in dicts]) for k in dicts[0]}
        return cls(torch.cat([o.logits.detach() for o in outs]), join([o.unimodal for o in outs]),
                   join([o.features for o in outs]))


def _tags(names: tuple[str, ...]) -> dict[str, str]:
    """Suffix of each modality's step statistics: its first letter when those are unique
    (audio/visual -> rho_a, rho_v), else the whole name."""
    first = [n[0] for n in names]
    return {n: (n[0] if len(set(first)) == len(first) else n) for n in names}


class Modalities:
    """The model side of a method (README: Plug-in API).

    - ``model``: the module (not its DDP wrapper; a wrapper is unwrapped).
    - ``params``: modality name -> that modality's encoder, as a module or an iterable of
      parameters of ``model``. The order of the names is the modalities' order everywhere
      (statistics, noise draws). At least one modality; methods balance two or more.
    - ``modulated``: the subset of each modality's parameters whose gradients OGM, GE and AGM
      change (default: all of ``params``; our models: the encoders' conv weights, as the
      reference code).
    - ``forward(model, inputs, hook) -> Output``: runs ``model`` (the module, its DDP wrapper or a
      copy) on ``inputs`` (modality -> tensor); ``hook`` (None or a function features dict ->
      features dict) replaces the pooled features before fusion. Under DDP it must call the
      module itself (``model(...)``), so the wrapper sees the forward. Needed by methods that run
      the model themselves (``Method.needs``).
    - ``unimodal(model, features) -> {name: logits}``: the head's unimodal logits for given
      features (OPM, which drops features by them before fusion).
    - ``head``: the fusion head (a module or parameters; AGM clips by its gradients).
    - ``num_classes``, ``dims`` (feature width per modality): for methods that add heads.
    - ``stages``: modality -> channels of its feature maps after each encoder stage, for a model
      whose forward calls ``hook.stage(i, maps)`` (when the hook has that attribute) after stage
      i of every encoder, with ``maps[u]`` of shape (B, C_i, ...), and goes on with the maps it
      returns: mid-fusion methods (greedy) insert layers there.
    """

    def __init__(self, model: nn.Module, params: Mapping[str, nn.Module | Iterable[torch.Tensor]], *,
                 modulated: Mapping[str, nn.Module | Iterable[torch.Tensor]] | None = None,
                 forward: Callable[[nn.Module, dict, FeatureHook | None], Output] | None = None,
                 unimodal: Callable[[nn.Module, dict], dict] | None = None,
                 head: nn.Module | Iterable[torch.Tensor] | None = None,
                 num_classes: int | None = None, dims: Mapping[str, int] | None = None,
                 stages: Mapping[str, Iterable[int]] | None = None):
        self.model = getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) \
            else model
        if not params:
            raise ConfigError("Modalities: give at least one modality's parameters")
        self.names: tuple[str, ...] = tuple(params)
        self.tags = _tags(self.names)
        named = {id(p): n for n, p in self.model.named_parameters()}
        self._param_names = {u: self._names_of(params[u], named, u) for u in self.names}
        if modulated is not None and set(modulated) - set(self.names):
            raise ConfigError(f"Modalities: modulated names {sorted(set(modulated) - set(self.names))} "
                              "are not among the modalities")
        self._modulated_names = {u: (self._names_of(modulated[u], named, u) if modulated and u in modulated
                                     else self._param_names[u]) for u in self.names}
        self._head_names = self._names_of(head, named, "head") if head is not None else []
        self._forward, self._unimodal = forward, unimodal
        self.num_classes = num_classes
        self.dims = dict(dims) if dims is not None else None
        self.stages = {u: tuple(stages[u]) for u in self.names} if stages is not None else None
        self._resolve()

    @staticmethod
    def _names_of(group, named: dict[int, str], what: str) -> list[str]:
        ps = list(group.parameters()) if isinstance(group, nn.Module) else list(group)
        missing = [p for p in ps if id(p) not in named]
        if missing:
            raise ConfigError(f"Modalities: {len(missing)} parameter(s) of {what!r} are not parameters of the model")
        return [named[id(p)] for p in ps]

    def _resolve(self) -> None:
        by_name = dict(self.model.named_parameters())
        self._params = {u: [by_name[n] for n in ns] for u, ns in self._param_names.items()}
        self._modulated = {u: [by_name[n] for n in ns] for u, ns in self._modulated_names.items()}
        self._head = [by_name[n] for n in self._head_names]

    def __repr__(self):
        return f"Modalities({', '.join(f'{u}: {len(self._params[u])} tensors' for u in self.names)})"

    # -- parameters

    def params(self, name: str) -> list[nn.Parameter]:
        """Every parameter of modality ``name``'s encoder (MMPareto's per-encoder gradients)."""
        return self._params[name]

    def modulated(self, name: str) -> list[nn.Parameter]:
        """The parameters of ``name`` whose gradients OGM/GE/AGM modulate."""
        return self._modulated[name]

    def head_params(self) -> list[nn.Parameter]:
        return self._head

    @property
    def aux(self) -> nn.Module | None:
        """The trainable modules a method added to this model (``Method.setup``), or None."""
        return getattr(self.model, AUX, None)

    # -- running the model

    def run(self, inputs: dict, hook: FeatureHook | None = None, *, model: nn.Module | None = None) -> Output:
        """``forward(model or self.model, inputs, hook)``."""
        if self._forward is None:
            raise ConfigError("this method runs the model itself: give Modalities(..., forward=...)")
        return self._forward(self.model if model is None else model, inputs, hook)

    def unimodal_logits(self, features: dict, *, model: nn.Module | None = None) -> dict:
        if self._unimodal is None:
            raise ConfigError("this method needs each modality's logits from its features: "
                              "give Modalities(..., unimodal=...)")
        return self._unimodal(self.model if model is None else model, features)

    def has(self, part: str) -> bool:
        """Whether the model side gives ``part``: forward, unimodal, head, num_classes, dims, stages."""
        return {"forward": self._forward is not None, "unimodal": self._unimodal is not None,
                "head": bool(self._head), "num_classes": self.num_classes is not None,
                "dims": self.dims is not None, "stages": self.stages is not None}[part]

    def copy(self) -> Modalities:
        """The same description of a deep copy of the model (its attached method modules too)."""
        twin = copy_module.copy(self)
        twin.model = copy_module.deepcopy(self.model)
        twin._resolve()
        return twin
