"""TSM-AV: Temporal Shift Module (Lin, Gan, Han, ICCV 2019) in the visual ResNet-18 of TSN-AV, as
the OGM-GE paper's Table 3 (README: Models of other frameworks).

Everything is TSN-AV (``tsn.py``) except the visual trunk: inside every residual block the input
of the residual branch (before its first convolution) is shifted along time across the clip's n
sampled frames, X of shape (B, n, C, H, W):

    Y[:, t, 0:C/8]      = X[:, t+1, 0:C/8]       (zero at t = n-1)
    Y[:, t, C/8:2C/8]   = X[:, t-1, C/8:2C/8]    (zero at t = 0)
    Y[:, t, 2C/8:]      = X[:, t, 2C/8:]

(TSM's "residual shift" with 1/8 of the channels each way; the identity path is not shifted, so
the block keeps each frame's own features). The shift costs no parameters and no FLOPs. With
``--arch small`` (no residual blocks) the shift precedes each conv-BN-ReLU block (TSM's in-place
variant), so the small model still mixes frames.

Unimodal scores for OGM: exact, as TSN-AV (the streams meet only in the averaged scores).
"""
from __future__ import annotations

from typing import cast

import torch
from torch import nn

from ..models import BasicBlock, VisualEncoder
from .tsn import TSNAV

FOLD_DIV = 8


def temporal_shift(x: torch.Tensor, frames: int, fold_div: int = FOLD_DIV) -> torch.Tensor:
    """The shift above on (B*n, C, H, W) feature maps (frames of a clip consecutive)."""
    bn, c, h, w = x.shape
    x = x.view(bn // frames, frames, c, h, w)
    fold = c // fold_div
    zero = x.new_zeros(x.shape[0], 1, fold, h, w)
    back = torch.cat([x[:, 1:, :fold], zero], dim=1)              # frame t gets frame t+1's channels
    fwd = torch.cat([zero, x[:, :-1, fold:2 * fold]], dim=1)      # frame t gets frame t-1's
    return torch.cat([back, fwd, x[:, :, 2 * fold:]], dim=2).view(bn, c, h, w)


class Shifted(nn.Module):
    """``module(temporal_shift(x))``."""

    def __init__(self, module: nn.Module, frames: int):
        super().__init__()
        self.module, self.frames = module, frames

    def forward(self, x):
        return self.module(temporal_shift(x, self.frames))


def shifted_encoder(arch: str, frames: int) -> VisualEncoder:
    """A visual encoder whose trunk shifts along time (residual shift in every BasicBlock)."""
    enc = VisualEncoder(arch)
    blocks = [m for m in enc.trunk.modules() if isinstance(m, BasicBlock)]
    for block in blocks:
        block.conv1 = Shifted(block.conv1, frames)  # type: ignore[assignment]
    if not blocks:          # the small trunk: shift before each conv
        body = cast(nn.Sequential, enc.trunk.body)
        for i, m in enumerate(body):
            if isinstance(m, nn.Conv2d):
                body[i] = Shifted(m, frames)
    return enc


class TSMAV(TSNAV):
    name = "tsm-av"

    def __init__(self, *, arch: str, frames: int, **kwargs):
        super().__init__(arch=arch, frames=frames, visual_encoder=shifted_encoder(arch, frames), **kwargs)
