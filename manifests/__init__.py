"""Shipped dataset definitions: class lists (label order) and JSON schemas of our files."""
from __future__ import annotations

import json
from importlib import resources


def load(name: str) -> dict:
    """The shipped JSON document ``name`` (without .json)."""
    return json.loads(resources.files(__name__).joinpath(f"{name}.json").read_text(encoding="utf-8"))
