"""Dataset adapters (README: Datasets): one module per raw layout, all with the interface of ``_base``.

Each module defines one ``Adapter`` (``ADAPTER``: name, layout, class count, the paper's clip
length, ``discover`` and its synthetic layout). ``ADAPTERS`` is the one registry: every name to
its adapter, in the order the CLI lists them; ``get(name)`` looks one up.
"""
from __future__ import annotations

from ..errors import ConfigError
from . import ave, cremad, folder, kinetics_sounds, vggsound
from ._base import SPLITS, Adapter, Clip, Discovery, Problem, hash_split, make_key

ADAPTERS: dict[str, Adapter] = {m.ADAPTER.name: m.ADAPTER
                                for m in (cremad, kinetics_sounds, vggsound, ave, folder)}


def get(name: str) -> Adapter:
    """The adapter called ``name`` (``kinetics_sounds`` and other case/underscore spellings accepted)."""
    adapter = ADAPTERS.get(str(name).strip().lower().replace("_", "-"))
    if adapter is None:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(ADAPTERS)}")
    return adapter


__all__ = ["ADAPTERS", "Adapter", "get", "SPLITS", "Clip", "Discovery", "Problem", "hash_split", "make_key"]
