"""Imported once by the local engine's forkserver (``engines._mp_context``): the extraction
code, warmed up (``sample.warm_up``), so every worker forked from it starts warm."""
from .sample import warm_up

try:
    warm_up()
except Exception:  # noqa: BLE001 - an optimisation only: the forkserver must start regardless
    pass
