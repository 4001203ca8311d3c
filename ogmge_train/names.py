"""Torch-free registries: the one list of names for each choice of a training run.

``config`` validates against these, the CLI builds its choices from ``config.CHOICES`` (which
is assembled from here), and ``models``/``modulation`` key their classes by the same strings;
a test checks that every name here has its class and vice versa.
"""
from __future__ import annotations

ARCHS = ("resnet18", "small")
FUSIONS = ("concat", "sum", "film", "gated")
MODALITIES = ("both", "audio", "visual")
HEAD_INITS = ("xavier", "torch")
# modulation methods, one module each in ogmge_train/modulation/
METHODS = ("none", "ogm", "ge", "ogm-ge", "modality-drop", "gradient-blending", "opm", "opm-ge", "pmr", "mmpareto",
           "agm")
# methods that work with some fusion heads only (the others work with every head)
METHOD_FUSIONS = {"opm": ("concat", "sum"), "opm-ge": ("concat", "sum")}
SCOPES = ("conv", "all")
# GE's noise: the official code's N(0, std(g)) per tensor, or the paper's mini-batch gradient covariance
GE_NOISES = ("code", "paper")
DROP_MODALITIES = ("either", "audio", "visual")
# modality-drop: zero the dropped modality's pooled features, or its input (the paper's Table 2)
DROP_AT = ("features", "input")
# which frames of a clip a run feeds the visual encoder (README: Training): random per segment in
# training and segment middles in evaluation; the first ones (OGM-GE's CREMA-D and VGGSound loaders);
# fixed ones at seg * i (its KS/AVE loader)
FRAME_PICKS = ("segment", "first", "fixed")
# the split whose accuracy selects a run's best epoch; "test" is the reference code's protocol
SELECT_ON = ("val", "test")
# the words every output puts next to a number selected that way
SELECTION_LABELS = {"val": "selected on validation accuracy", "test": "best test epoch, as the reference code",
                    "last": "last epoch (no split to select on)"}
ON_NONFINITE = ("stop", "skip")
OPTIMIZERS = ("sgd", "adam", "adamw")
DEVICES = ("auto", "cpu", "cuda")
AMPS = ("none", "bf16")
