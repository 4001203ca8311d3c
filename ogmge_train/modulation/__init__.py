"""Modulation methods (SPEC §5), one module each behind ``Method`` (see ``base.py``).

``build(name, alpha=..., start_epoch=..., end_epoch=...)`` makes one; ``NAMES`` lists them.
"""
from __future__ import annotations

from avprep.errors import ConfigError

from .base import STAT_KEYS, Method, coefficients, modulate, unimodal_scores
from .ge import GE
from .modality_drop import ModalityDrop
from .none import NoModulation
from .ogm import OGM
from .ogm_ge import OGMGE

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (NoModulation, OGM, GE, OGMGE, ModalityDrop)}
NAMES = tuple(METHODS)


def build(name: str, *, alpha: float, start_epoch: int, end_epoch: int | None,
          scope: str = "conv", drop_p: float = 0.5) -> Method:
    """The method called ``name``. ``drop_p`` only matters for modality-drop; the others ignore it."""
    if name not in METHODS:
        raise ConfigError(f"modulation must be one of {', '.join(NAMES)}, not {name!r}")
    if scope not in ("conv", "all"):
        raise ConfigError(f"modulation scope must be 'conv' or 'all', not {scope!r}")
    kwargs = dict(alpha=alpha, start_epoch=start_epoch, end_epoch=end_epoch, scope=scope)
    if name == ModalityDrop.name:
        if not 0.0 <= drop_p < 1.0:
            raise ConfigError(f"drop_p must be in [0, 1), not {drop_p}")
        kwargs["drop_p"] = drop_p
    return METHODS[name](**kwargs)


__all__ = ["NAMES", "METHODS", "STAT_KEYS", "Method", "build", "coefficients", "modulate", "unimodal_scores"]
