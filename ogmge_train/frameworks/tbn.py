"""TBN: Temporal Binding Network (Kazakos, Nagrani, Zisserman, Damen, ICCV 2019; EPIC-Fusion), as
the OGM-GE paper's Table 3 (README: Models of other frameworks).

The clip is cut into n equal segments; each segment is a temporal binding window (TBW): the
modalities sampled inside one window are fused before any prediction. In window k the visual
input is the frame the loader sampled in segment k and the audio input a window of
``--tbn-window`` spectrogram frames (128 = 1.27 s of the paper spectrogram, as TBN's 1.28 s)
inside the same segment, at a random offset in training (asynchronous sampling within the TBW,
as TBN trains) and centred in evaluation (the whole segment when it is shorter). Per window:

    h_k = ReLU(W_1 [g(a_k); f(v_k)] + b_1)          (mid-level fusion, 512 units as TBN's)
    s_k = W_2 dropout(h_k) + b_2
    logits = (1/n) sum_k s_k                         (average consensus)

Unimodal scores for OGM: the modalities interact inside W_1's ReLU, so there is no exact split;
each modality's scores are the fusion and consensus evaluated on its own window features with the
other modality's features replaced by their running mean (``_base``: mean substitution).
"""
from __future__ import annotations

import torch
from torch import nn

from ._base import Framework, split_time

HIDDEN = 512


class TBN(Framework):
    name = "tbn"
    options = ("dropout", "tbn_window")

    def __init__(self, *, dropout: float = 0.5, tbn_window: int = 128, **kwargs):
        super().__init__(**kwargs)
        if tbn_window < 1:
            raise ValueError(f"tbn_window must be >= 1, not {tbn_window}")
        self.window = int(tbn_window)
        self.fc1 = nn.Linear(self.audio_dim + self.visual_dim, HIDDEN)
        self.drop = nn.Dropout(dropout)
        self.fc_out = nn.Linear(HIDDEN, self.num_classes)
        self.finish()

    def feature_dims(self) -> dict[str, int]:
        return {"audio": self.frames * self.audio_dim, "visual": self.frames * self.visual_dim}

    def head_modules(self) -> list[nn.Module]:
        return [self.fc1, self.fc_out]

    def audio_windows(self, audio: torch.Tensor, n: int) -> torch.Tensor:
        """(B, 1, F, T) -> (B*n, 1, F, w): one window of w frames inside each of the n segments."""
        axis = self.time_axis(audio)
        seg = split_time(audio, n, axis).movedim(axis + 1, -1)                  # (B, n, 1, X, L)
        length = seg.shape[-1]
        w = min(self.window, length)
        b = seg.shape[0]
        if self.training:       # torch's global RNG: seeded by the run, saved in checkpoints
            start = torch.randint(0, length - w + 1, (b, n))
        else:
            start = torch.full((b, n), (length - w) // 2, dtype=torch.long)
        index = (start.to(seg.device)[:, :, None, None, None] + torch.arange(w, device=seg.device))
        windows = seg.gather(-1, index.expand(*seg.shape[:-1], w))
        return windows.movedim(-1, axis + 1).flatten(0, 1)

    def encode(self, audio, visual):
        b, n = visual.shape[:2]
        v = self.visual_encoder.trunk(visual.flatten(0, 1)).mean(dim=(2, 3))            # (B*n, Dv)
        a = self.audio_encoder(self.audio_windows(audio, n))                             # (B*n, Da)
        return {"audio": a.view(b, -1), "visual": v.view(b, -1)}

    def fuse(self, features):
        a = features["audio"].unflatten(1, (self.frames, -1))
        v = features["visual"].unflatten(1, (self.frames, -1))
        h = torch.relu(self.fc1(torch.cat([a, v], dim=2)))
        return self.fc_out(self.drop(h)).mean(dim=1), None
