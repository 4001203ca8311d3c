"""``ume``: Uni-Modal Ensemble (Du, Teng, Li, Liu, Yuan, Wang, Yuan, Zhao, ICML 2023): uni-modal
models trained independently, their predictions combined at test time.

One linear classifier per modality (``setup``: ``model.aux_heads``, xavier init, ``head_init``);
the training loss is ``sum_u CE(h_u(f_u))``. Encoder u and head u receive only the gradient of
their own term, so one run trains each modality's model exactly as a separate uni-modal run on
the same batches would (SGD/Adam/AdamW act per parameter; tested against two separately trained
uni-modal models); no teacher or earlier run is needed. Evaluation (``fuse``): the mean of the
uni-modal logits ``(1/M) sum_u h_u(f_u)`` (``unimodal``: the ``h_u(f_u)``). The method is the
training objective: it applies in every epoch (the modulation window does not cut it). Our fusion
head is not used: ``--fusion concat`` only (its parameters, reached with zero gradients for DDP,
stay unused). Any number of modalities. Step stats: rho from the ``h_u(f_u)`` (k = 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modalities import Modalities, Output
from ..names import METHOD_FUSIONS
from .base import Method, Step, linear_heads


class UME(Method):
    name = "ume"
    fusions = METHOD_FUSIONS["ume"]
    options = ("head_init",)
    needs = ("num_classes", "dims")

    def __init__(self, *, head_init: str = "xavier", **kwargs):
        super().__init__(**kwargs)
        self.head_init = head_init

    def setup(self, modalities: Modalities) -> nn.Module:
        return linear_heads(modalities, self.head_init)

    def unimodal(self, out: Output, modalities: Modalities) -> dict[str, torch.Tensor]:
        heads = modalities.aux
        assert isinstance(heads, nn.ModuleDict), "ume: its heads were not set up (build it with a Balancer)"
        return {u: heads[u](out.features[u]) for u in modalities.names}

    def fuse(self, out: Output, modalities: Modalities) -> torch.Tensor:
        return torch.stack(list(self.unimodal(out, modalities).values())).mean(0)

    def loss(self, out: Output, step: Step) -> torch.Tensor:
        logits = self.unimodal(out, step.modalities)
        loss = 0.0 * out.logits.float().sum()
        for u in step.modalities.names:
            loss = loss + F.cross_entropy(logits[u].float(), step.labels)
        return loss

    def after_backward(self, out: Output, step: Step) -> dict[str, float]:
        with torch.no_grad():
            mine = Output(out.logits, self.unimodal(out, step.modalities), out.features)
        return super().after_backward(mine, step)
