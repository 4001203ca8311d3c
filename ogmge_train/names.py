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
# methods that train a separate linear classifier per modality (the model gets aux_heads)
AUX_HEAD_METHODS = ("gradient-blending", "mmpareto")
# methods that work with some fusion heads only (the others work with every head)
METHOD_FUSIONS = {"opm": ("concat", "sum"), "opm-ge": ("concat", "sum")}
SCOPES = ("conv", "all")
DROP_MODALITIES = ("either", "audio", "visual")
ON_NONFINITE = ("stop", "skip")
OPTIMIZERS = ("sgd", "adam", "adamw")
DEVICES = ("auto", "cpu", "cuda")
AMPS = ("none", "bf16")
