"""``none``: plain joint training. rho is still measured every step (to compare runs on it)."""
from .base import Method


class NoModulation(Method):
    name = "none"
