"""``ogm-ge`` (the default): scale the dominant modality's gradients by k_u, then add GE noise
(``--ge-noise code|paper``, see base.py)."""
from .base import Method


class OGMGE(Method):
    name = "ogm-ge"
    scales = True
    noise = True
    options = ("ge_noise",)
