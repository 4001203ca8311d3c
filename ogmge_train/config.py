"""Training settings (README: Training): one frozen ``TrainConfig`` and the ``--preset`` values.

Precedence, lowest first: field defaults < preset < explicit settings. Two defaults depend on
the dataset (``alpha`` and ``frames``); they stay ``None`` until ``with_dataset`` fills them from
dataset.json's ``name``, so an explicit value always wins and config.json records what ran.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import names
from .errors import ConfigError

# Every choice of a run, from the one registry in names.py (the CLI builds its flags from this).
CHOICES = {
    "fusion": names.FUSIONS,
    "modulation": names.METHODS,
    "modulation_scope": names.SCOPES,
    "ge_noise": names.GE_NOISES,
    "drop_modality": names.DROP_MODALITIES,
    "drop_at": names.DROP_AT,
    "modality": names.MODALITIES,
    "head_init": names.HEAD_INITS,
    "on_nonfinite": names.ON_NONFINITE,
    "optimizer": names.OPTIMIZERS,
    "arch": names.ARCHS,
    "audio_arch": names.AUDIO_ARCHS,
    "model": names.MODELS,
    "task": names.TASKS,
    "device": names.DEVICES,
    "amp": names.AMPS,
    "select_on": names.SELECT_ON,
    "frame_pick": names.FRAME_PICKS,
}

# alpha per dataset, each from a released script of the paper's group (README: Training, "alpha per
# dataset"): CREMA-D 0.8 and VGGSound 0.1 (OGM-GE README, "Tips"), Kinetics-Sounds 0.8 (the TPAMI
# code's KS script, BML_TPAMI2024 scripts/train_ogm.sh), AVE 0.2 (PMR's bash.sh, its OGM-GE runs on
# AVE). Any other dataset: 0.3, our choice, with no source.
ALPHA_OF_DATASET = {"cremad": 0.8, "vggsound": 0.1, "kinetics-sounds": 0.8, "ave": 0.2}
ALPHA_OTHER = 0.3
# Frames per clip (the paper: 1 for CREMA-D, 3 for the others).
_FRAMES = {"cremad": 1}
_FRAMES_OTHER = 3


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. Epochs are counted from 0 (as in the reference code)."""

    shards: str = ""
    out: str = ""
    fusion: str = "concat"
    modulation: str = "ogm-ge"
    alpha: float | None = None            # None: per dataset
    modulation_start: int = 0             # first modulated epoch (inclusive)
    modulation_end: int = 50              # last modulated epoch (inclusive; reference code's default)
    modulation_scope: str = "conv"
    ge_noise: str = "code"                # GE noise: code (official code, N(0, std(g))) or paper (eq. 13 covariance)
    drop_p: float = 0.5                   # modality-drop probability
    drop_modality: str = "either"         # modality-drop: which modality a dropped sample loses
    drop_at: str = "features"             # modality-drop: zero the pooled features or the input
    opm_q_base: float = 0.5               # opm/opm-ge: base drop probability (TPAMI code: q_base)
    opm_lam: float = 0.5                  # opm/opm-ge: growth with the discrepancy (lam)
    opm_p_exe: float = 0.7                # opm/opm-ge: probability that a step drops at all (p_exe)
    pmr_alpha: float = 1.0                # pmr: weight of the weaker modality's prototype loss
    pmr_momentum: float = 0.2             # pmr: prototype momentum (weight of the old prototype)
    pmr_entropy: float = 0.0              # pmr: mu of the prototypical entropy regularisation (0: off)
    pmr_entropy_epochs: int = 10          # pmr: PER in the first this many modulated epochs
    gb_super_epoch: int = 10              # gradient-blending: epochs between weight estimates
    gb_holdout: float = 0.08              # gradient-blending: part of train held out to estimate the weights
    agm_alpha: float = 0.1                # agm: strength of the gradient coefficients
    relearn_lambda: float = 3.0           # relearning: w = tanh(lambda * purity gap) (official script)
    relearn_every: int = 20               # relearning: epochs between re-initialisations (official script)
    relearn_times: int = 3                # relearning: number of re-initialisations (official script)
    relearn_holdout: float = 0.11         # relearning: part of train held out for the diagnosis (official val share)
    inforeg_beta_a: float = 0.95          # inforeg: proximal strength when audio dominates (official code)
    inforeg_beta_v: float = 0.1           # inforeg: proximal strength when visual dominates (official code)
    inforeg_window: float = 0.05          # inforeg: the prime learning window lasts while the gain rate exceeds this
    cml_lambda: float = 0.1               # cml: weight of the confidence penalty (BalanceBenchmark)
    recon_w1: float = 5.0                 # reconboost: weight of the learner's own CE term (official code)
    recon_w2: float = 1.0                 # reconboost: weight of the others'-ensemble term (official code)
    mmcosine_scale: float = 15.0          # mmcosine: scale s of the cosine logits (BalanceBenchmark)
    recon_boost_rate: float = 1.0         # reconboost: initial ensemble rate (official code; BalanceBenchmark 0.01)
    head_init: str = "xavier"             # fusion head init: xavier (reference code) or torch
    on_nonfinite: str = "stop"            # a non-finite loss/gradient: stop (NonFiniteError) or skip the step
    amco_sigma: float = 0.5               # amco: softmax share above which a modality is dependent (BalanceBenchmark)
    amco_eps: float = 0.3                 # amco: the mask ratio reaches 1 at level eps (BalanceBenchmark)
    greedy_eps: float = 0.01              # greedy: |d_BDR| above which a re-balancing window starts (official)
    greedy_window: int = 5                # greedy: steps of a re-balancing window (official)
    umt_teacher_audio: str | None = None  # umt: folder of the --modality audio run distilled into the audio encoder
    umt_teacher_visual: str | None = None  # umt: folder of the --modality visual run for the visual encoder
    umt_scaling: float = 10.0             # umt: weight of the feature MSE terms (BalanceBenchmark)
    amss_temperature: float = 0.2         # amss/amss-plus: temperature of the keep shares (official AV code)
    valuation_part_ratio: float = 0.2     # valuation-modality: share of samples valued for the mean (official)
    modality: str = "both"
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "sgd"
    weight_decay: float = 1e-4
    lr_step: int = 70
    lr_gamma: float = 0.1
    frames: int | None = None             # None: per dataset
    frame_pick: str = "segment"           # which frames of a clip (names.FRAME_PICKS)
    image_size: int = 224
    arch: str = "resnet18"
    audio_arch: str = "same"              # audio encoder: same as --arch, or xvector (the x-vector TDNN)
    model: str = "av"                     # av (encoders + --fusion head) or a framework (ogmge_train/frameworks)
    task: str = "classification"          # classification, or localisation (one label per 1 s segment, AVE)
    dropout: float = 0.5                  # tsn-av, tsm-av, tbn: dropout before the classifier
    tbn_window: int = 128                 # tbn: spectrogram frames of the audio window in each binding window
    psp_threshold: float = 0.099          # psp: pruning threshold of the segment-pair similarities
    psp_avps_weight: float = 100.0        # psp (localisation): weight of the AVPS loss
    encoder_weights: str | None = None    # a state dict file to initialise the encoders from
    freeze_encoders: bool = False         # frameworks: keep the encoders fixed (features as precomputed ones)
    audio_bins: int | None = None         # the spectrogram's frequency bins, from dataset.json (x-vector input)
    workers: int = 2
    device: str = "auto"
    amp: str = "none"
    seed: int = 0
    s3_endpoint: str | None = None
    eval_splits: tuple[str, ...] = ("val", "test")
    select_on: str = "val"                # the split whose accuracy selects the best epoch
    eval_every: int = 1                   # evaluate every N epochs and after the last (selection sees those)
    dataset: str = ""                     # dataset.json's name, filled by with_dataset

    def __post_init__(self):
        """Every choice against its registry, then one range check per line: a table of the
        fields' rules, long because the fields are many (split, it would only be cut in two)."""
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"--{_flag(name)} must be one of {', '.join(allowed)}, not {value!r}")
        _check(self.epochs >= 1, "epochs", "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(self.lr_step >= 1, "lr_step", "must be >= 1")
        _check(self.workers >= 0, "workers", "must be >= 0")
        _check(self.eval_every >= 1, "eval_every", "must be >= 1")
        _check(self.image_size >= 16, "image_size", "must be >= 16")
        _check(0.0 <= self.drop_p < 1.0, "drop_p", "must be in [0, 1)")
        _check(0.0 <= self.opm_q_base <= 1.0, "opm_q_base", "must be in [0, 1]")
        _check(self.opm_lam >= 0, "opm_lam", "must be >= 0")
        _check(0.0 <= self.opm_p_exe <= 1.0, "opm_p_exe", "must be in [0, 1]")
        _check(self.pmr_alpha >= 0, "pmr_alpha", "must be >= 0")
        _check(self.agm_alpha >= 0, "agm_alpha", "must be >= 0")
        _check(self.relearn_lambda >= 0, "relearn_lambda", "must be >= 0")
        _check(self.relearn_every >= 1, "relearn_every", "must be >= 1")
        _check(self.relearn_times >= 0, "relearn_times", "must be >= 0")
        _check(0.0 < self.relearn_holdout < 1.0, "relearn_holdout", "must be in (0, 1)")
        _check(self.inforeg_beta_a >= 0, "inforeg_beta_a", "must be >= 0")
        _check(self.inforeg_beta_v >= 0, "inforeg_beta_v", "must be >= 0")
        _check(self.cml_lambda >= 0, "cml_lambda", "must be >= 0")
        _check(self.mmcosine_scale > 0, "mmcosine_scale", "must be > 0")
        _check(self.recon_w1 >= 0, "recon_w1", "must be >= 0")
        _check(self.recon_w2 >= 0, "recon_w2", "must be >= 0")
        _check(self.gb_super_epoch >= 1, "gb_super_epoch", "must be >= 1")
        _check(0.0 < self.gb_holdout < 1.0, "gb_holdout", "must be in (0, 1)")
        _check(0.0 <= self.pmr_momentum <= 1.0, "pmr_momentum", "must be in [0, 1]")
        _check(self.pmr_entropy >= 0, "pmr_entropy", "must be >= 0")
        _check(self.pmr_entropy_epochs >= 0, "pmr_entropy_epochs", "must be >= 0")
        _check(0.0 <= self.amco_sigma <= 1.0, "amco_sigma", "must be in [0, 1]")
        _check(self.amco_eps > 0, "amco_eps", "must be > 0")
        _check(self.greedy_eps >= 0, "greedy_eps", "must be >= 0")
        _check(self.greedy_window >= 1, "greedy_window", "must be >= 1")
        _check(self.umt_scaling >= 0, "umt_scaling", "must be >= 0")
        _check(self.amss_temperature > 0, "amss_temperature", "must be > 0")
        _check(0.0 < self.valuation_part_ratio <= 1.0, "valuation_part_ratio", "must be in (0, 1]")
        if self.modality == "both" and (why := names.fusion_error(self.modulation, self.fusion)) is not None:
            raise ConfigError(why)
        _check(self.frames is None or self.frames >= 1, "frames", "must be >= 1")
        _check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        _check(self.tbn_window >= 1, "tbn_window", "must be >= 1")
        _check(0.0 <= self.psp_threshold < 1.0, "psp_threshold", "must be in [0, 1)")
        _check(self.psp_avps_weight >= 0, "psp_avps_weight", "must be >= 0")
        if self.task not in names.MODEL_TASKS[self.model]:
            raise ConfigError(f"--model {self.model} is for {' or '.join(names.MODEL_TASKS[self.model])}, "
                              f"not --task {self.task}")
        if self.model != "av" and self.modality != "both":
            raise ConfigError(f"--model {self.model} is audio-visual: --modality {self.modality} needs --model av")
        _check(self.alpha is None or self.alpha >= 0, "alpha", "must be >= 0")
        _check(self.modulation_end >= self.modulation_start, "modulation_end", "must be >= --modulation-start")
        if not isinstance(self.eval_splits, tuple):
            object.__setattr__(self, "eval_splits", tuple(self.eval_splits))

    def with_dataset(self, name: str, spec_shape: tuple[int, ...] | None = None,
                     spec_kind: str | None = None, segments: int | None = None) -> TrainConfig:
        """Fill the dataset-dependent defaults (alpha, frames) that were not given explicitly, and
        the spectrogram's frequency bins (dataset.json's ``spec_shape``: (F, T), fbank (T, mel)).
        Localisation takes one frame per 1 s segment: ``frames`` defaults to ``segments``."""
        frames = self.frames
        if frames is None:
            frames = segments if self.task == "localisation" and segments else _FRAMES.get(name, _FRAMES_OTHER)
        bins = self.audio_bins
        if bins is None and spec_shape and len(spec_shape) == 2:
            bins = int(spec_shape[1] if spec_kind == "fbank" else spec_shape[0])
        return dataclasses.replace(
            self,
            dataset=name,
            audio_bins=bins,
            alpha=ALPHA_OF_DATASET.get(name, ALPHA_OTHER) if self.alpha is None else self.alpha,
            frames=frames,
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eval_splits"] = list(self.eval_splits)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of ``to_dict``; unknown keys are an error (a config.json from another version)."""
        unknown = set(d) - FIELDS
        if unknown:
            raise ConfigError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
        d = dict(d)
        if "eval_splits" in d:
            d["eval_splits"] = tuple(d["eval_splits"])
        return cls(**d)


FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
# The roles of the fields that do not say what the experiment is, defined once here:
# where and how a run runs;
RUNTIME_FIELDS = frozenset({"out", "shards", "s3_endpoint", "workers", "device"})
# what a resumed run may change (``train --resume``): that, and for how long it runs;
RESUMABLE_FIELDS = RUNTIME_FIELDS | {"epochs"}
# what runs of one experiment differ in (``report`` groups such runs as its seeds); UMT's teacher
# runs differ per seed by design (each seed learns from the uni-modal runs of its own seed).
NOT_EXPERIMENT_FIELDS = RUNTIME_FIELDS | {"seed", "eval_splits", "umt_teacher_audio", "umt_teacher_visual"}

_BB = dict(arch="resnet18", epochs=30, batch_size=32, lr=1e-3, optimizer="adamw", weight_decay=0.01,
           lr_step=10, lr_gamma=0.1, image_size=224, modulation_start=0, modulation_end=80)
# BalanceBenchmark's per-method settings (configs/trainer_config.yaml), applied by a bb-* preset to
# the method the run uses (explicit flags still win); methods it lacks keep our defaults.
BB_METHOD_SETTINGS: dict[str, dict] = {
    "ogm": dict(alpha=0.3, modulation_start=10), "ogm-ge": dict(alpha=0.3, modulation_start=10),
    "agm": dict(agm_alpha=0.1), "pmr": dict(pmr_alpha=0.6, pmr_momentum=0.5),
    "opm": dict(opm_q_base=0.4, opm_lam=0.5, opm_p_exe=0.7), "opm-ge": dict(opm_q_base=0.4, opm_lam=0.5, opm_p_exe=0.7),
    "gradient-blending": dict(gb_super_epoch=10), "cml": dict(cml_lambda=0.1),
    "relearning": dict(relearn_lambda=3.0, relearn_every=15, relearn_times=2),
    "reconboost": dict(recon_w1=5.0, recon_w2=1.0, recon_boost_rate=0.01), "mmcosine": dict(mmcosine_scale=15.0),
    "umt": dict(umt_scaling=10.0),
    "valuation-sample": dict(modulation_start=1),
    "valuation-modality": dict(modulation_start=1, valuation_part_ratio=0.2),
}
_PAPER = dict(arch="resnet18", epochs=100, batch_size=64, lr=1e-3, optimizer="sgd",
              lr_step=70, lr_gamma=0.1, image_size=224)
# Every epoch (MMPareto's official code has no modulation window).
_EVERY_EPOCH = 1_000_000
PRESETS: dict[str, dict] = {
    "paper-cremad": dict(_PAPER, alpha=ALPHA_OF_DATASET["cremad"], frames=1),
    "paper-ks": dict(_PAPER, alpha=ALPHA_OF_DATASET["kinetics-sounds"], frames=3),
    "paper-vggsound": dict(_PAPER, alpha=ALPHA_OF_DATASET["vggsound"], frames=3),
    "paper-ave": dict(_PAPER, alpha=ALPHA_OF_DATASET["ave"], frames=3),
    # AVE event localisation (Table 5): one frame per 1 s segment (frames left to the dataset)
    "paper-ave-loc": dict(_PAPER, alpha=ALPHA_OF_DATASET["ave"]),
    # PMR as its released scripts run it (fanyunfeng-bit/Modal-Imbalance-PMR, bash.sh: alpha 2.0,
    # momentum_coef 0.0, modulation epochs 0-70, 3 frames on CREMA-D, lr 1e-3, SGD as the paper's)
    "pmr-code": dict(_PAPER, modulation="pmr", pmr_alpha=2.0, pmr_momentum=0.0, modulation_start=0,
                     modulation_end=70, frames=3),
    # MMPareto as its official code runs it (GeWu-Lab/MMPareto_ICML2024, MMPareto.py defaults: 50
    # epochs, SGD lr 2e-3 x0.1 every 30 epochs, every step modulated, 2 frames, PyTorch's head init)
    "mmpareto-code": dict(_PAPER, modulation="mmpareto", epochs=50, lr=2e-3, lr_step=30, lr_gamma=0.1,
                          modulation_start=0, modulation_end=_EVERY_EPOCH, frames=2, head_init="torch"),
    # BalanceBenchmark's recipe (configs/global_config.yaml): ResNet-18 from scratch, AdamW lr 1e-3
    # weight decay 0.01, batch 32, 30 epochs, StepLR(10, 0.1); CREMA-D 2 frames (fps: 2), others 3.
    **{f"bb-{name}": dict(_BB, frames=frames) for name, frames in (("cremad", 2), ("ks", 3), ("vggsound", 3))},
    # Minutes on a laptop CPU: small CNN encoders on small images, a few epochs. The paper's
    # optimiser (SGD, momentum 0.9, weight decay 1e-4: Adam's per-parameter scaling would undo
    # most of OGM's k); lr chosen once, on visual-only runs of `make demo`'s task (README).
    "demo": dict(arch="small", image_size=64, epochs=8, batch_size=16, lr=3e-2,
                 optimizer="sgd", weight_decay=1e-4, lr_step=100, workers=0, modulation_end=100),
}


def resolve(preset: str | None = None, *, base: dict | None = None, **explicit) -> TrainConfig:
    """Build a config from ``base`` (e.g. a stored config.json), then ``preset``, then ``explicit``.

    ``None`` values in ``explicit`` mean "not given" (how click passes unset flags), so a flag
    can never be set to None on purpose; the dataset-dependent fields use None as "per dataset".
    """
    values = dict(base or {})
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    given = {k: v for k, v in explicit.items() if v is not None}
    if preset is not None and preset.startswith("bb-"):
        values.update(BB_METHOD_SETTINGS.get(str(given.get("modulation", values.get("modulation", "ogm-ge"))), {}))
    unknown = set(given) - FIELDS
    if unknown:
        raise ConfigError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
    values.update(given)
    if "eval_splits" in values:
        values["eval_splits"] = tuple(values["eval_splits"])
    return TrainConfig(**values)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"--{_flag(name)} {message}")
