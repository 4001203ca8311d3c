"""Modulation methods (README: Training), one module each behind ``Method`` (see ``base.py``).

``build(name, alpha=..., start_epoch=..., end_epoch=..., **options)`` makes one; the names are
``ogmge_train.names.METHODS`` (torch-free, shared with the config and the CLI). Each class lists
the method-specific ``options`` it takes (TrainConfig fields of the same name); ``build``
passes those and ignores the others, so the loop can hand every method the same settings.
A method runs in a training loop through ``ogmge_train.plugin.Balancer`` (ours and anyone's).
"""
from __future__ import annotations

from ..errors import ConfigError
from ..names import METHODS as NAMES
from ..names import fusion_error
from .agm import AGM
from .amco import AMCo
from .amss import AMSS, AMSSPlus
from .base import (
    STAT_KEYS,
    UNIT_STATS,
    EpochStart,
    Method,
    Step,
    StepResult,
    StepRun,
    coefficients,
    discrepancy,
    keep_rows,
    modulate,
    stat_keys,
    unimodal_scores,
    unit_stats,
)
from .cml import CML
from .ge import GE
from .gradient_blending import GradientBlending
from .greedy import Greedy
from .inforeg import InfoReg
from .lfm import LFM
from .mbsd import MBSD
from .mla import MLA
from .mmcosine import MMCosine
from .mmpareto import MMPareto
from .modality_drop import ModalityDrop
from .none import NoModulation
from .ogm import OGM
from .ogm_ge import OGMGE
from .opm import OPM, OPMGE
from .pmr import PMR
from .reconboost import ReconBoost
from .relearning import ReLearning
from .ume import UME
from .umt import UMT
from .valuation import ModalityValuation, SampleValuation

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (
    NoModulation, OGM, GE, OGMGE, ModalityDrop, GradientBlending, OPM, OPMGE, PMR, MMPareto, AGM, ReLearning,
    InfoReg, CML, MBSD, MLA, ReconBoost, MMCosine, UME, AMCo,
    Greedy, UMT, LFM, AMSS, AMSSPlus, SampleValuation, ModalityValuation)}
assert tuple(METHODS) == NAMES, "ogmge_train.names.METHODS and the method classes disagree"


def build(name: str, *, alpha: float = 0.0, start_epoch: int = 0, end_epoch: int | None = None,
          fusion: str | None = None, **options) -> Method:
    """The method called ``name``; ``options`` not listed in its class's ``options`` are ignored.

    With ``fusion`` given (one of our fusion heads), a method that does not work with that head
    raises ``ConfigError``.
    """
    if name not in METHODS:
        raise ConfigError(f"modulation must be one of {', '.join(NAMES)}, not {name!r}")
    cls = METHODS[name]
    if fusion is not None and (why := fusion_error(name, fusion)) is not None:
        raise ConfigError(why)
    mine = {k: v for k, v in options.items() if k in cls.options}
    try:
        return cls(alpha=alpha, start_epoch=start_epoch, end_epoch=end_epoch, **mine)
    except ValueError as e:
        raise ConfigError(f"--modulation {name}: {e}") from None


__all__ = [
    "METHODS",
    "NAMES",
    "STAT_KEYS",
    "UNIT_STATS",
    "EpochStart",
    "Method",
    "Step",
    "StepResult",
    "StepRun",
    "build",
    "coefficients",
    "discrepancy",
    "keep_rows",
    "modulate",
    "stat_keys",
    "unimodal_scores",
    "unit_stats",
]
