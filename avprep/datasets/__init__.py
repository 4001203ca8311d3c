"""Dataset adapters (SPEC §2): one module per raw layout, all with the interface of ``_base``.

``get(name)`` returns the adapter module; ``ADAPTERS`` maps every name to its module, in the
order the CLI lists them.
"""
from __future__ import annotations

from types import ModuleType

from ..errors import ConfigError
from . import ave, cremad, folder, kinetics_sounds, vggsound
from ._base import SPLITS, Clip, Discovery, Problem, hash_split, make_key

ADAPTERS: dict[str, ModuleType] = {m.NAME: m for m in (cremad, kinetics_sounds, vggsound, ave, folder)}


def get(name: str) -> ModuleType:
    """The adapter called ``name`` (``kinetics_sounds`` and other case/underscore spellings accepted)."""
    adapter = ADAPTERS.get(str(name).strip().lower().replace("_", "-"))
    if adapter is None:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(ADAPTERS)}")
    return adapter


__all__ = ["ADAPTERS", "get", "SPLITS", "Clip", "Discovery", "Problem", "hash_split", "make_key"]
