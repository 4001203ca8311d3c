"""``ge``: generalization enhancement only: noise on both encoders' gradients, no scaling (Table 7).
``--ge-noise code`` (default): ``N(0, std(g))`` per tensor; ``paper``: the covariance of eq. 13."""
from .base import Method


class GE(Method):
    name = "ge"
    noise = True
    options = ("ge_noise",)
