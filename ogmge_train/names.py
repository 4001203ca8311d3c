"""Torch-free registries: the one list of names for each choice of a training run.

``config`` validates against these, the CLI builds its choices from ``config.CHOICES`` (which
is assembled from here), and ``models``/``modulation`` key their classes by the same strings;
a test checks that every name here has its class and vice versa.
"""
from __future__ import annotations

# encoder trunks (README: Training): ResNet-18 or the small CPU CNN
ARCHS = ("resnet18", "small")
# the audio encoder: "same" as --arch, or the x-vector TDNN (Table 4; ogmge_train/xvector.py)
AUDIO_ARCHS = ("same", "xvector")
# models (README: Models of other frameworks): "av" = our encoders + a --fusion head; the others are the
# paper's Table 3 (tsn-av, tsm-av, tbn, psp) and Table 5 (avga, psp) models, one module each in
# ogmge_train/frameworks/
MODELS = ("av", "tsn-av", "tsm-av", "tbn", "psp", "avga")
# what a model is trained for: one label per clip, or one per 1 s segment (AVE event localisation)
TASKS = ("classification", "localisation")
MODEL_TASKS = {"av": ("classification",), "tsn-av": ("classification",), "tsm-av": ("classification",),
               "tbn": ("classification",), "psp": ("classification", "localisation"), "avga": ("localisation",)}
FUSIONS = ("concat", "sum", "film", "gated")
MODALITIES = ("both", "audio", "visual")
HEAD_INITS = ("xavier", "torch")
# modulation methods, one module each in ogmge_train/modulation/
METHODS = ("none", "ogm", "ge", "ogm-ge", "modality-drop", "gradient-blending", "opm", "opm-ge", "pmr", "mmpareto",
           "agm", "relearning", "inforeg", "cml", "mbsd", "mla", "reconboost", "mmcosine", "ume",
           "amco", "greedy", "umt", "lfm", "amss", "amss-plus",
           "valuation-sample", "valuation-modality")
# one line per method (the CLI's --modulation help; README: Training gives the equations)
METHOD_HELP = {
    "none": "plain joint training (cross-entropy of the fused logits)",
    "ogm": "OGM (CVPR 2022): the dominant encoder's gradients scaled by 1 - tanh(alpha rho)",
    "ge": "GE (CVPR 2022): Gaussian noise of the gradients' own std, no scaling",
    "ogm-ge": "OGM-GE (CVPR 2022): OGM scaling plus GE noise",
    "modality-drop": "modality dropout before fusion (OGM-GE Table 2)",
    "gradient-blending": "Gradient-Blending (CVPR 2020): loss weights from overfitting-to-generalisation ratios",
    "opm": "OPM (TPAMI 2024): drop the dominant modality's features, probability from the discrepancy",
    "opm-ge": "OPM plus GE noise",
    "pmr": "PMR (CVPR 2023): prototype cross-entropy for the weaker modality",
    "mmpareto": "MMPareto (ICML 2024): Pareto combination of multimodal and unimodal gradients",
    "agm": "AGM (ICCV 2023): Shapley-style mono-modal responses, exponential gradient scaling",
    "relearning": "Diagnosing & Re-learning (ECCV 2024): purity gap train vs held-out drives soft re-initialisation",
    "inforeg": "InfoReg (CVPR 2025): proximal term on the dominant encoder in the prime learning window",
    "cml": "CML (ICML 2023): penalise confidence that rises when a modality is removed",
    "mbsd": "MBSD (BalanceBenchmark): unimodal losses plus confidence-weighted logit and KL distillation",
    "mla": "MLA (CVPR 2024): alternating unimodal steps through one shared head, entropy-gated fusion at test",
    "reconboost": "ReconBoost (ICML 2024): a boosting step per modality, each followed by a global rectification",
    "mmcosine": "MMCosine (ICASSP 2023): scaled cosine logits per modality block of the head, summed",
    "ume": "UME (ICML 2023): each modality trained as its own unimodal model, their logits averaged at test",
    "amco": "AMCo (ICASSP 2023): class mask on the dependent modality's logits, unimodal co-optimisation",
    "greedy": "Greedy (ICML 2022): MMTM mid-fusion, re-balancing windows from conditional learning speeds",
    "umt": "UMT (ICML 2023): features of frozen uni-modal teacher runs distilled into the encoders (MSE)",
    "lfm": "LFM (NeurIPS 2024): CE and a modality-alignment loss mixed by an epoch-fitted weight",
    "amss": "AMSS (TPAMI 2025): encoder gradient units kept by Fisher importance, fewer for the significant modality",
    "amss-plus": "AMSS+ (TPAMI 2025): AMSS with kept units rescaled by 1 / (p + 1/n)",
    "valuation-sample": "Sample-level valuation (CVPR 2024): per-sample Shapley values; copies train the low one alone",
    "valuation-modality": "Modality-level valuation (CVPR 2024): copies of random samples train the weaker modality",
}
# methods that work with some fusion heads only (the others work with every head); a method
# class's ``fusions`` is its entry here (``fusions = METHOD_FUSIONS["opm"]``), and ``fusion_error``
# is the rule the config and ``modulation.build`` apply
METHOD_FUSIONS = {"opm": ("concat", "sum"), "opm-ge": ("concat", "sum"),
                  "mla": ("concat",), "reconboost": ("concat",),
                  "mmcosine": ("concat", "sum"), "ume": ("concat",),
                  "amco": ("concat", "sum"), "greedy": ("sum",),
                  "lfm": ("concat", "sum")}
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


def fusion_error(method: str, fusion: str) -> str | None:
    """Why ``method`` cannot run with our fusion head ``fusion`` (``METHOD_FUSIONS``), or None."""
    allowed = METHOD_FUSIONS.get(method)
    if allowed is None or fusion in allowed:
        return None
    return f"--modulation {method} works with --fusion {' or '.join(allowed)}, not {fusion!r}"
