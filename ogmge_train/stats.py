"""Statistics of paired seed-by-seed comparisons (the demo, `make compare`, `reproduce`).

Two arms trained with the same seeds see the same data order and initialisation, so each seed
gives one paired difference ``d_s = treated_s - base_s``. On those differences:

- ``paired_difference``: mean, sample SD, a 95% Student-t interval and the exact sign-flip
  permutation test (under H0 "no effect" each d_s is as likely to have either sign, so all 2^n
  sign patterns are equally likely; the p-value is the share of patterns whose |mean| is at
  least the observed one);
- ``holm``: Holm's step-down adjustment over a family of planned contrasts (controls the
  family-wise error rate without assuming independence);
- ``tost``: the paired two one-sided t-tests for equivalence within a margin, which is what
  "no effect larger than X" needs (a non-significant difference is not evidence of none);
- ``minimal_detectable_effect``: the true mean difference a two-sided paired t-test at level
  alpha detects with the given power, from an SD (normal-theory approximation with t quantiles).

The Student-t distribution is computed here (regularised incomplete beta by Lentz's continued
fraction, quantiles by bisection), so the library needs no scipy; the tests compare every
function with scipy and with naive re-implementations.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

__all__ = ["mean_std", "t_cdf", "t_quantile", "t_quantile_975", "sign_flip_p", "sign_flip_floor", "paired_difference",
           "holm", "tost", "equivalence_bound", "minimal_detectable_effect", "EXACT_SIGN_FLIP_MAX"]

# Up to this many pairs the sign-flip test enumerates every pattern (2^20 ~ 1e6, well under a
# second); above it, a seeded Monte-Carlo sample of patterns (marked "exact": False).
EXACT_SIGN_FLIP_MAX = 20
_MC_DRAWS = 200_000


def mean_std(values) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1) of the non-None values; (None, None) if none. One value has
    no measured spread: its std is None (shown without "±")."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    if len(xs) == 1:
        return xs[0], None
    return float(np.mean(xs)), float(np.std(xs, ddof=1))


# ----------------------------------------------------------------------------- Student's t

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
                 + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError("df must be > 0")
    if math.isinf(x):
        return 1.0 if x > 0 else 0.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + x * x))     # P(T > |x|)
    return 1.0 - tail if x > 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t (bisection on ``t_cdf`` to 1e-12)."""
    if not 0.0 < q < 1.0:
        raise ValueError("q must be in (0, 1)")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t (the half-width factor of a 95% interval)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    return t_quantile(0.975, df)


# ----------------------------------------------------------------------------- tests

def sign_flip_p(d) -> tuple[float, bool]:
    """Two-sided sign-flip permutation p-value of the mean of ``d`` and whether it is exact.

    p = share of sign patterns s in {-1, 1}^n with |mean(s * d)| >= |mean(d)| (the observed
    pattern included, so p >= 2 / 2^n when no d is 0). Exact enumeration up to
    ``EXACT_SIGN_FLIP_MAX`` pairs; beyond, ``_MC_DRAWS`` seeded random patterns (+1 for the
    observed one). Comparisons allow a relative 1e-9 so that float rounding does not split ties."""
    d = np.asarray(list(d), dtype=float)
    n = len(d)
    if n == 0:
        return 1.0, True
    observed = abs(float(d.sum()))
    tol = 1e-9 * max(float(np.abs(d).sum()), 1e-300)
    if n <= EXACT_SIGN_FLIP_MAX:
        hits = 0
        # every pattern, in chunks of 2^k rows: bits of the pattern index are the signs
        k = min(n, 16)
        low = 1 - 2 * ((np.arange(2 ** k)[:, None] >> np.arange(k)) & 1)      # (2^k, k) of +-1
        low_sums = low @ d[:k]
        for high in itertools.product((1.0, -1.0), repeat=n - k):
            rest = float(np.dot(high, d[k:])) if n > k else 0.0
            hits += int(np.count_nonzero(np.abs(low_sums + rest) >= observed - tol))
        return hits / 2 ** n, True
    rng = np.random.default_rng(0)
    hits = 1
    for start in range(0, _MC_DRAWS, 10_000):
        signs = rng.choice((-1.0, 1.0), size=(min(10_000, _MC_DRAWS - start), n))
        hits += int(np.count_nonzero(np.abs(signs @ d) >= observed - tol))
    return hits / (_MC_DRAWS + 1), False


def sign_flip_floor(n: int) -> float:
    """The smallest p ``sign_flip_p`` can give for ``n`` pairs, whatever the data: 2 / 2^n when it
    enumerates (the observed sign pattern and its mirror), 1 / (draws + 1) past
    ``EXACT_SIGN_FLIP_MAX``. With n seeds no contrast can reach a level below it."""
    if n <= 0:
        return 1.0
    return min(1.0, 2 / 2 ** n) if n <= EXACT_SIGN_FLIP_MAX else 1 / (_MC_DRAWS + 1)


def paired_difference(base: dict, treated: dict) -> dict:
    """``treated - base`` over the seeds both have (dicts seed -> value).

    Returns ``n``, ``seeds``, ``diffs`` (per seed), ``mean``, ``sd`` (ddof=1), ``ci`` (95%
    t-interval; None below two seeds), ``p`` (exact sign-flip p-value; None without seeds),
    ``p_exact``, ``up``/``down`` (seeds that rose / fell) and ``base``/``treated`` (mean, std)
    over those seeds."""
    seeds = sorted(set(base) & set(treated))
    out = {"n": len(seeds), "seeds": seeds}
    if not seeds:
        return {**out, "diffs": [], "mean": None, "sd": None, "ci": None, "p": None, "p_exact": True,
                "up": 0, "down": 0, "base": (None, None), "treated": (None, None)}
    d = np.array([treated[s] - base[s] for s in seeds], dtype=float)
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if len(d) > 1 else None
    ci = None
    if sd is not None:
        half = t_quantile_975(len(d) - 1) * sd / math.sqrt(len(d))
        ci = (mean - half, mean + half)
    p, exact = sign_flip_p(d)
    return {**out, "diffs": d.tolist(), "mean": mean, "sd": sd, "ci": ci, "p": p, "p_exact": exact,
            "up": int((d > 0).sum()), "down": int((d < 0).sum()),
            "base": mean_std(base[s] for s in seeds), "treated": mean_std(treated[s] for s in seeds)}


def holm(pvalues: dict) -> dict:
    """Holm's step-down adjusted p-values: ``{name: p}`` -> ``{name: p_adj}`` (None stays None
    and does not count towards the family size). With the m p-values sorted ascending,
    ``p_adj(i) = max_{j <= i} min(1, (m - j + 1) p(j))``; reject where ``p_adj <= alpha``."""
    given = sorted(((p, name) for name, p in pvalues.items() if p is not None), key=lambda t: t[0])
    m = len(given)
    out: dict = {name: None for name in pvalues}
    running = 0.0
    for j, (p, name) in enumerate(given):
        running = max(running, min(1.0, (m - j) * p))
        out[name] = running
    return out


def tost(diffs, margin: float) -> dict:
    """Paired equivalence test: two one-sided t-tests of H0 ``mean <= -margin`` and H0
    ``mean >= margin``. Returns ``p`` (the larger one-sided p; equivalence at level alpha when
    ``p < alpha``), ``p_lower``, ``p_upper`` and ``n``. Needs two or more pairs and a positive SD."""
    d = np.asarray(list(diffs), dtype=float)
    n = len(d)
    if n < 2 or margin <= 0:
        return {"n": n, "p": None, "p_lower": None, "p_upper": None, "margin": margin}
    se = float(d.std(ddof=1)) / math.sqrt(n)
    if se == 0:
        inside = abs(float(d.mean())) < margin
        return {"n": n, "p": 0.0 if inside else 1.0, "p_lower": None, "p_upper": None, "margin": margin}
    mean = float(d.mean())
    p_lower = 1.0 - t_cdf((mean + margin) / se, n - 1)      # H0: mean <= -margin
    p_upper = t_cdf((mean - margin) / se, n - 1)            # H0: mean >= +margin
    return {"n": n, "p": max(p_lower, p_upper), "p_lower": p_lower, "p_upper": p_upper, "margin": margin}


def equivalence_bound(diffs, alpha: float = 0.05) -> float | None:
    """The smallest margin that TOST at level ``alpha`` accepts: the larger absolute end of the
    (1 - 2 alpha) t-interval of the mean difference (None below two pairs)."""
    d = np.asarray(list(diffs), dtype=float)
    if len(d) < 2:
        return None
    half = t_quantile(1.0 - alpha, len(d) - 1) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return abs(float(d.mean())) + half


def minimal_detectable_effect(sd: float | None, n: int, *, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """Smallest true mean paired difference a two-sided paired t-test at level ``alpha`` detects
    with probability ``power`` over ``n`` pairs of SD ``sd``: ``(t_{1-alpha/2} + t_{power}) * sd /
    sqrt(n)`` with n - 1 degrees of freedom (the usual approximation of the noncentral t; the
    tests check it against scipy's noncentral t within 2 points of power)."""
    if sd is None or n < 2:
        return None
    df = n - 1
    return (t_quantile(1.0 - alpha / 2, df) + t_quantile(power, df)) * sd / math.sqrt(n)
