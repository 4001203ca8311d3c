"""PSP: positive sample propagation (Zhou, Zheng, Wang, Hong, Wang, CVPR 2021), the backbone of the
OGM-GE paper's Table 3 (clip classification) and its Table 5 model (fully supervised event
localisation on AVE) (README: Models of other frameworks, Localisation on AVE).

Per segment t of S (S frames, the spectrogram cut into S chunks): audio features a_t from the
audio encoder, projected by two linear maps (512 -> 256 -> 128); visual maps attended by the
projected audio (AVGA's audio-guided attention, ``avga.py``) and projected likewise; a
bidirectional LSTM per modality (128 units per direction) gives 256-d sequences A, V (S x 256).
The PSP module then, with branches A_1 = drop(ReLU(A W_a1)), A_2, V_1, V_2 likewise (256 units):

    beta  = ReLU(V_2 A_1^T / sqrt(256))              segment-pair similarity, visual rows, audio columns
    beta_va = beta / row sums,  beta_av = beta^T / row sums
    gamma = beta 1[beta > tau], renormalised per row  (pruning: only positive pairs propagate;
                                                       tau = --psp-threshold, 0.099 as the paper)
    V' = LN(drop(ReLU((V + gamma_va A_2) W_v)))      audio propagated into each visual segment,
    A' = LN(drop(ReLU((A + gamma_av V_1) W_a)))      and visual into each audio segment
    F  = (V' + A') / 2

and per segment logits = W_2 ReLU(W_1 F_t) (64 units, no biases). Localisation: one prediction
per segment over the C events plus background, loss CE + lambda * AVPS, where AVPS is the mean
squared error between the segments' normalised positive audio-visual cosine similarities
ReLU(cos(A'_t, V'_t)) / sum_t ReLU(cos(A'_t, V'_t)) and the ground truth 1/|E| on the clip's event
segments E (0 elsewhere); lambda = --psp-avps-weight, 100 as the official code. Classification
(Table 3): the average of the S segments' logits (consensus), no AVPS term (no segment labels).

Unimodal scores for OGM: the modalities interact before the classifier (the attention and the
propagation), so each modality's scores are the PSP module and classifier evaluated on its LSTM
sequence with the other modality's sequence replaced by its running mean (``_base``: mean
substitution); the streams are each modality's encoder, projection and LSTM.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._base import Framework
from .avga import LSTM_UNITS, AudioGuidedAttention, init_attention, segment_inputs

WIDTH = 2 * LSTM_UNITS


def _prune(beta: torch.Tensor, threshold: float) -> torch.Tensor:
    """Row-normalise, keep entries above ``threshold``, row-normalise again."""
    beta = beta / (beta.sum(dim=-1, keepdim=True) + 1e-8)
    gamma = beta * (beta > threshold).to(beta.dtype)
    return gamma / (gamma.sum(dim=-1, keepdim=True) + 1e-8)


class PositiveSamplePropagation(nn.Module):
    """(A, V) of shape (B, S, d) -> (F, A', V') (see the module docstring)."""

    def __init__(self, dim: int = WIDTH, hidden: int = WIDTH, threshold: float = 0.099, dropout: float = 0.1):
        super().__init__()
        # a1, v2 meet in the similarities (``hidden`` wide); a2, v1 are propagated, so ``dim`` wide
        self.a1, self.a2 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, dim, bias=False)
        self.v1, self.v2 = nn.Linear(dim, dim, bias=False), nn.Linear(dim, hidden, bias=False)
        self.a_out, self.v_out = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.threshold, self.hidden = threshold, hidden

    def forward(self, a, v):
        a1, a2 = (self.drop(F.relu(f(a))) for f in (self.a1, self.a2))
        v1, v2 = (self.drop(F.relu(f(v))) for f in (self.v1, self.v2))
        beta = F.relu(torch.bmm(v2, a1.transpose(1, 2)) / math.sqrt(self.hidden))   # (B, S_v, S_a)
        gamma_va, gamma_av = _prune(beta, self.threshold), _prune(beta.transpose(1, 2), self.threshold)
        v_new = self.norm(self.drop(F.relu(self.v_out(v + torch.bmm(gamma_va, a2)))))
        a_new = self.norm(self.drop(F.relu(self.a_out(a + torch.bmm(gamma_av, v1)))))
        return (v_new + a_new) / 2, a_new, v_new


def avps_loss(a: torch.Tensor, v: torch.Tensor, events: torch.Tensor) -> torch.Tensor:
    """AVPS: MSE between normalised ReLU(cos(a_t, v_t)) over the segments and 1/|E| on the event
    segments (``events``: (B, S) bool; a clip without events has an all-zero target)."""
    sim = F.relu(F.cosine_similarity(a, v, dim=-1, eps=1e-12))
    sim = sim / (sim.sum(dim=-1, keepdim=True) + 1e-8)
    target = events.float() / events.float().sum(dim=-1, keepdim=True).clamp(min=1)
    return F.mse_loss(sim.float(), target)


class PSP(Framework):
    name = "psp"
    options = ("task", "psp_threshold", "psp_avps_weight")

    def __init__(self, *, task: str = "classification", psp_threshold: float = 0.099, psp_avps_weight: float = 100.0,
                 **kwargs):
        self.task = task            # before the base sets num_classes (localisation: + background)
        super().__init__(**kwargs)
        da, dv = self.audio_dim, self.visual_dim
        self.fa = nn.Sequential(nn.Linear(da, 256, bias=False), nn.Linear(256, 128, bias=False))
        self.attention = AudioGuidedAttention(128, dv)
        self.fv = nn.Sequential(nn.Linear(dv, 256, bias=False), nn.Linear(256, 128, bias=False))
        self.lstm_a = nn.LSTM(128, LSTM_UNITS, batch_first=True, bidirectional=True)
        self.lstm_v = nn.LSTM(128, LSTM_UNITS, batch_first=True, bidirectional=True)
        self.psp = PositiveSamplePropagation(threshold=psp_threshold)
        self.fc1 = nn.Linear(WIDTH, 64, bias=False)
        self.fc2 = nn.Linear(64, self.num_classes, bias=False)
        self.avps_weight = float(psp_avps_weight)
        self.has_model_loss = task == "localisation" and self.avps_weight > 0
        self.finish()
        init_attention(self.attention, self.head_init)

    @property
    def rows_per_clip(self) -> int:
        return self.frames if self.task == "localisation" else 1

    def feature_dims(self) -> dict[str, int]:
        d = WIDTH * self.frames // self.rows_per_clip
        return {"audio": d, "visual": d}

    def streams(self):
        return {"audio": [self.audio_encoder, self.fa, self.lstm_a],
                "visual": [self.visual_encoder, self.fv, self.lstm_v]}

    def head_modules(self):
        return [self.psp, self.fc1, self.fc2]

    def encode(self, audio, visual):
        b, s = visual.shape[:2]
        a, maps = segment_inputs(self, audio, visual)
        a = self.fa(a)
        c, _ = self.attention(a, maps)
        ha, _ = self.lstm_a(a.view(b, s, -1))
        hv, _ = self.lstm_v(self.fv(c).view(b, s, -1))
        rows = b * self.rows_per_clip
        return {"audio": ha.reshape(rows, -1), "visual": hv.reshape(rows, -1)}

    def fuse(self, features):
        a = features["audio"].reshape(-1, self.frames, WIDTH)
        v = features["visual"].reshape(-1, self.frames, WIDTH)
        fused, a_new, v_new = self.psp(a, v)
        logits = self.fc2(F.relu(self.fc1(fused)))                       # (B, S, K)
        logits = logits.flatten(0, 1) if self.task == "localisation" else logits.mean(dim=1)
        return logits, (a_new, v_new)

    def model_loss(self, extra, labels):
        a_new, v_new = extra
        events = labels.view(-1, self.frames) != self.num_classes - 1      # the background is the last class
        return self.avps_weight * avps_loss(a_new, v_new, events)
