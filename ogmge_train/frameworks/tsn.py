"""TSN-AV: Temporal Segment Networks (Wang et al., ECCV 2016) with a ResNet-18 audio stream, as the
OGM-GE paper's Table 3 (README: Models of other frameworks).

The clip is cut into n equal segments and one frame is sampled in each (the loader: a random
point of the segment in training, its middle in evaluation). Each snippet T_k goes through the
visual ConvNet and a linear classifier, F(T_k) = W_v f(T_k) + b_v; the segmental consensus is
the average, G_v = (1/n) sum_k F(T_k) (TSN's best consensus function). The audio stream is the
audio encoder and its own classifier, G_a = W_a g(audio) + b_a. Streams are fused as TSN fuses
its streams, by (equally) weighted averaging of their class scores: logits = (G_a + G_v) / 2.
Dropout (``--dropout``, 0.5 as the TSM/TBN code's default) precedes both classifiers.

Unimodal scores for OGM: the streams meet only in the averaged scores, so each modality's own
scores are exact: G_a and G_v.
"""
from __future__ import annotations

import torch
from torch import nn

from ._base import Framework


class TSNAV(Framework):
    name = "tsn-av"
    exact_unimodal = True
    options = ("dropout",)

    def __init__(self, *, dropout: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.drop = nn.Dropout(dropout)
        self.fc_a = nn.Linear(self.audio_dim, self.num_classes)
        self.fc_v = nn.Linear(self.visual_dim, self.num_classes)
        self.finish()

    def feature_dims(self) -> dict[str, int]:
        return {"audio": self.audio_dim, "visual": self.frames * self.visual_dim}

    def head_modules(self) -> list[nn.Module]:
        return [self.fc_a, self.fc_v]

    def encode(self, audio, visual):
        b, n = visual.shape[:2]
        snippets = self.visual_encoder.trunk(visual.flatten(0, 1)).mean(dim=(2, 3))     # f(T_k), (B*n, D)
        return {"audio": self.audio_encoder(audio), "visual": snippets.unflatten(0, (b, n)).flatten(1)}

    def stream_scores(self, features) -> dict[str, torch.Tensor]:
        d = self.visual_dim
        snippets = features["visual"].unflatten(1, (-1, d))                               # (B, n, D)
        return {"audio": self.fc_a(self.drop(features["audio"])),
                "visual": self.fc_v(self.drop(snippets)).mean(dim=1)}                     # consensus G_v

    def fuse(self, features):
        g = self.stream_scores(features)
        return (g["audio"] + g["visual"]) / 2, None

    def unimodal(self, features):
        return self.stream_scores(features)
