"""The x-vector TDNN audio encoder (Snyder et al., ICASSP 2018; README: Models of other frameworks).

Frame-level layers are time-delay layers, each an affine map of spliced frames followed by ReLU
and batch normalisation without learnt scale or offset (Kaldi's ``relu-batchnorm-layer``):

    tdnn1: frames {t-2, ..., t+2}  -> 512      (a Conv1d of kernel 5)
    tdnn2: frames {t-2, t, t+2}    -> 512      (kernel 3, dilation 2)
    tdnn3: frames {t-3, t, t+3}    -> 512      (kernel 3, dilation 3)
    tdnn4: frame {t}               -> 512
    tdnn5: frame {t}               -> 1500

then statistics pooling (mean and standard deviation over all frames, 3000-d; variance floored at
1e-10 as Kaldi's) and two segment-level layers of 512 (``tdnn6``, whose affine output is the
x-vector proper, and ``tdnn7``). The speaker network ends in a softmax over speakers; here the
encoder returns ``tdnn7``'s output and the model's fusion head takes the softmax's place, so the
whole network is trained end to end from scratch on the task, as every encoder of this build.
The input frames are the spectrogram's time steps, its frequency bins the per-frame features.
``--arch small`` scales every width by 1/4 (128, 375, 128) for CPU tests.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["XVector"]

# (kernel, dilation) of tdnn1..tdnn5: the frame contexts above
_CONTEXTS = ((5, 1), (3, 2), (3, 3), (1, 1), (1, 1))


def _relu_bn(layer: nn.Module, width: int) -> nn.Sequential:
    # Kaldi's batchnorm component has no learnt scale or offset
    return nn.Sequential(layer, nn.ReLU(inplace=True), nn.BatchNorm1d(width, affine=False))


class XVector(nn.Module):
    """(B, 1, F, T) spectrogram (or (B, 1, T, F) fbank: the axis of length ``bins`` is frequency)
    -> (B, D) segment-level features, D = 512 (``small``: 128)."""

    def __init__(self, bins: int, small: bool = False):
        super().__init__()
        frame, stats, segment = (128, 375, 128) if small else (512, 1500, 512)
        widths = (frame, frame, frame, frame, stats)
        layers, cin = [], bins
        for (k, d), w in zip(_CONTEXTS, widths):
            layers.append(_relu_bn(nn.Conv1d(cin, w, k, dilation=d), w))
            cin = w
        self.frames = nn.Sequential(*layers)
        self.segment6 = _relu_bn(nn.Linear(2 * stats, segment), segment)
        self.segment7 = _relu_bn(nn.Linear(segment, segment), segment)
        self.bins, self.out_dim = bins, segment
        # the shortest input the frame layers accept: their summed context
        self.min_frames = 1 + sum((k - 1) * d for k, d in _CONTEXTS)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = audio.squeeze(1)
        if x.shape[1] != self.bins and x.shape[2] == self.bins:
            x = x.transpose(1, 2)                       # fbank: (B, T, mel) -> (B, mel, T)
        if x.shape[1] != self.bins:
            raise ValueError(f"x-vector: expected {self.bins} frequency bins, got input of shape {tuple(audio.shape)}")
        if x.shape[2] < self.min_frames:
            raise ValueError(f"x-vector: needs at least {self.min_frames} frames, got {x.shape[2]}")
        h = self.frames(x)                               # (B, C, T')
        mean = h.mean(dim=2)
        std = h.var(dim=2, unbiased=False).clamp(min=1e-10).sqrt()
        return self.segment7(self.segment6(torch.cat([mean, std], dim=1)))
