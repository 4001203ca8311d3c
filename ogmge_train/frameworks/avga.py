"""AVGA: audio-guided visual attention for audio-visual event localisation (Tian, Shi, Li, Duan,
Xu, ECCV 2018: the "A+V-att" model), as the OGM-GE paper's Table 5 (README: Localisation on AVE).

A clip is S one-second segments (S frames, the spectrogram cut into S equal chunks). Segment t
gives an audio feature a_t (the audio encoder on chunk t) and visual feature maps v_t with k
positions v_t^i (the visual trunk before pooling). The attention over positions is guided by
the audio, as the paper's equations:

    x_t^i = w^T tanh(W_v ReLU(U_v v_t^i) + W_a ReLU(U_a a_t))     (U: 512 units, W: 49, as the paper's
    alpha_t = softmax_i(x_t^i),   c_t = sum_i alpha_t^i v_t^i      7 x 7 maps)

Audio {a_t} and attended visual {c_t} sequences each go through a bidirectional LSTM (128 units
per direction), the two outputs are concatenated per segment and classified into the C events
plus background by ReLU, a 64-unit layer, ReLU and a linear layer; the loss is the
cross-entropy of every segment (the supervised setting). The official code adds the audio term
of the attention along the positions axis (its sizes coincide at 49); we follow the equation.

Unimodal scores for OGM: the streams (encoder + LSTM of each modality; the attention is
cross-modal and belongs to neither) meet at the concatenation before a non-linear classifier, so
each modality's scores are that classifier on its LSTM output with the other's replaced by its
running mean (``_base``: mean substitution).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import Framework, frame_maps, split_time

LSTM_UNITS = 128


class AudioGuidedAttention(nn.Module):
    """c = sum_i alpha_i v_i with alpha = softmax_i(w^T tanh(W_v ReLU(U_v v_i) + W_a ReLU(U_a a)))."""

    def __init__(self, audio_dim: int, visual_dim: int, hidden: int = 512, width: int = 49):
        super().__init__()
        self.u_a = nn.Linear(audio_dim, hidden)
        self.u_v = nn.Linear(visual_dim, hidden)
        self.w_a = nn.Linear(hidden, width, bias=False)
        self.w_v = nn.Linear(hidden, width, bias=False)
        self.w = nn.Linear(width, 1, bias=False)

    def forward(self, a: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a (N, Da), maps (N, Dv, h, w) -> (attended (N, Dv), alpha (N, h*w))."""
        v = maps.flatten(2).transpose(1, 2)                                  # (N, k, Dv)
        guide = self.w_a(F.relu(self.u_a(a))).unsqueeze(1)                   # (N, 1, width)
        x = self.w(torch.tanh(self.w_v(F.relu(self.u_v(v))) + guide)).squeeze(2)
        alpha = x.softmax(dim=1)
        return torch.bmm(alpha.unsqueeze(1), v).squeeze(1), alpha


def segment_inputs(model: Framework, audio: torch.Tensor, visual: torch.Tensor):
    """(audio features (B*S, Da), visual maps (B*S, Dv, h, w)) of S segments."""
    b, s = visual.shape[:2]
    chunks = split_time(audio, s, model.time_axis(audio)).flatten(0, 1)
    return model.audio_encoder(chunks), frame_maps(model.visual_encoder, visual).flatten(0, 1)


class AVGA(Framework):
    name = "avga"
    task = "localisation"
    options = ()

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        da, dv = self.audio_dim, self.visual_dim
        self.attention = AudioGuidedAttention(da, dv)
        self.lstm_a = nn.LSTM(da, LSTM_UNITS, batch_first=True, bidirectional=True)
        self.lstm_v = nn.LSTM(dv, LSTM_UNITS, batch_first=True, bidirectional=True)
        self.fc1 = nn.Linear(4 * LSTM_UNITS, 64)
        self.fc2 = nn.Linear(64, self.num_classes)
        self.finish()
        init_attention(self.attention, self.head_init)

    def feature_dims(self) -> dict[str, int]:
        return {"audio": 2 * LSTM_UNITS, "visual": 2 * LSTM_UNITS}

    def streams(self):
        return {"audio": [self.audio_encoder, self.lstm_a], "visual": [self.visual_encoder, self.lstm_v]}

    def head_modules(self):
        return [self.fc1, self.fc2]

    def encode(self, audio, visual):
        b, s = visual.shape[:2]
        a, maps = segment_inputs(self, audio, visual)
        c, _ = self.attention(a, maps)
        ha, _ = self.lstm_a(a.view(b, s, -1))
        hv, _ = self.lstm_v(c.view(b, s, -1))
        return {"audio": ha.flatten(0, 1), "visual": hv.flatten(0, 1)}               # one row per segment

    def fuse(self, features):
        h = F.relu(torch.cat([features["audio"], features["visual"]], dim=1))
        return self.fc2(F.relu(self.fc1(h))), None


def init_attention(attention: nn.Module, head_init: str) -> None:
    """Xavier-uniform attention weights, as the AVE and PSP code initialise them (zero biases, as our heads)."""
    if head_init != "xavier":
        return
    for m in attention.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
