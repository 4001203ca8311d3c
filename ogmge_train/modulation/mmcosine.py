"""``mmcosine``: MMCosine (Xu, Wu, Wei, Hu, ICASSP 2023), as BalanceBenchmark's ``MMCosine_trainer``
runs it.

The fusion head's weight is split into one block per modality (``W_u``, C x d_u: the columns of
the concat head's matrix that read modality u, or the sum head's per-modality matrix); each
modality's logits are scaled cosines, ``z_u[c] = s * cos(f_u, W_u[c])`` (features and class
weights L2-normalised, no bias; ``mmcosine_scale`` s = 15, the benchmark's), the fused logits
``z = sum_u z_u``. Training loss in the active epochs ``CE(z)`` (outside them ``CE`` of the head's
ordinary logits, as the benchmark); evaluation always uses ``z`` (``fuse``; ``unimodal``: the
``z_u``). Works with a linear head over the concatenated features or one linear head per
modality: our ``concat`` and ``sum`` (film and gated have no per-modality block; refused), any
number of modalities. The head bias is unused (reached with a zero gradient, for DDP). Step
stats: rho from the ``z_u`` (k = 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..modalities import Modalities, Output
from ..names import METHOD_FUSIONS
from .base import Method, Step


def weight_blocks(modalities: Modalities) -> dict[str, torch.Tensor]:
    """Modality -> its block of the head's weight (ValueError when the head has no such blocks)."""
    assert modalities.dims is not None
    names, dims, c = modalities.names, modalities.dims, modalities.num_classes
    ws = [w for w in modalities.head_params() if w.dim() == 2]       # weights (a module gives biases too)
    if len(ws) == 1 and tuple(ws[0].shape) == (c, sum(dims[u] for u in names)):
        return dict(zip(names, ws[0].split([dims[u] for u in names], dim=1)))
    if len(ws) == len(names) and all(tuple(w.shape) == (c, dims[u]) for w, u in zip(ws, names)):
        return dict(zip(names, ws))
    raise ValueError("needs a linear head over the concatenated features or one linear head per modality "
                     f"(head weights {[tuple(w.shape) for w in ws]}, features {dict(dims)})")


def cosine_logits(features: dict[str, torch.Tensor], blocks: dict[str, torch.Tensor], scale: float
                  ) -> dict[str, torch.Tensor]:
    """``s * normalize(f_u) @ normalize(W_u)^T`` per modality."""
    return {u: scale * F.normalize(features[u].float(), dim=1) @ F.normalize(blocks[u].float(), dim=1).T
            for u in blocks}


class MMCosine(Method):
    name = "mmcosine"
    fusions = METHOD_FUSIONS["mmcosine"]
    options = ("mmcosine_scale",)
    needs = ("head", "num_classes", "dims")

    def __init__(self, *, mmcosine_scale: float = 15.0, **kwargs):
        super().__init__(**kwargs)
        if mmcosine_scale <= 0:
            raise ValueError(f"mmcosine_scale must be > 0, not {mmcosine_scale}")
        self.scale = float(mmcosine_scale)

    def setup(self, modalities: Modalities) -> None:
        weight_blocks(modalities)          # refuse a head without per-modality blocks now
        return None

    def unimodal(self, out: Output, modalities: Modalities) -> dict[str, torch.Tensor]:
        return cosine_logits(out.features, weight_blocks(modalities), self.scale)

    def fuse(self, out: Output, modalities: Modalities) -> torch.Tensor:
        return torch.stack(list(self.unimodal(out, modalities).values())).sum(0)

    def loss(self, out: Output, step: Step) -> torch.Tensor:
        if not self.active(step.epoch):
            return F.cross_entropy(out.logits.float(), step.labels)
        fused = self.fuse(out, step.modalities)
        return F.cross_entropy(fused, step.labels) + 0.0 * out.logits.float().sum()

    def after_backward(self, out: Output, step: Step) -> dict[str, float]:
        with torch.no_grad():
            mine = Output(out.logits, self.unimodal(out, step.modalities), out.features)
        return super().after_backward(mine, step)
