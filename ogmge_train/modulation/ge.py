"""``ge``: generalization enhancement only: Gaussian noise on both encoders, no scaling (Table 7)."""
from .base import Method


class GE(Method):
    name = "ge"
    noise = True
