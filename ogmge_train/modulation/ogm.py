"""``ogm``: on-the-fly gradient modulation only, no noise (the paper's Table 2 OGM row)."""
from .base import Method


class OGM(Method):
    name = "ogm"
    scales = True
