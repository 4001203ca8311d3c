"""ogmge_train.stats against naive re-implementations written here and against scipy where scipy
has the same test (scipy is a test dependency only)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from ogmge_train import stats


def test_t_distribution_matches_scipy():
    for df in (1, 2, 3, 5, 9, 19, 30, 31, 60, 200):
        for q in (0.5, 0.6, 0.8, 0.9, 0.95, 0.975, 0.995):
            assert stats.t_quantile(q, df) == pytest.approx(sps.t.ppf(q, df), rel=1e-9, abs=1e-12)
            assert stats.t_quantile(1 - q, df) == pytest.approx(sps.t.ppf(1 - q, df), rel=1e-9, abs=1e-12)
        for x in (-30.0, -4.0, -1.0, -0.1, 0.0, 0.5, 2.0, 7.0):
            assert stats.t_cdf(x, df) == pytest.approx(sps.t.cdf(x, df), rel=1e-10, abs=1e-14)
        assert stats.t_quantile_975(df) == pytest.approx(sps.t.ppf(0.975, df), rel=1e-9)
    with pytest.raises(ValueError):
        stats.t_quantile_975(0)


def _naive_sign_flip(d) -> float:
    """Every sign pattern, one by one."""
    observed = abs(sum(d))
    hits = sum(abs(sum(s * x for s, x in zip(signs, d))) >= observed - 1e-12
               for signs in itertools.product((1, -1), repeat=len(d)))
    return hits / 2 ** len(d)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 13, 17])
def test_sign_flip_is_exact_and_matches_a_naive_enumeration_and_scipy(n):
    rng = np.random.default_rng(n)
    d = rng.normal(0.01, 0.02, n)
    p, exact = stats.sign_flip_p(d)
    assert exact and p == pytest.approx(_naive_sign_flip(d.tolist()), abs=1e-12)
    if n == 1:
        assert p == 1.0           # scipy needs two observations
        return
    ref = sps.permutation_test((d,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples",
                               n_resamples=np.inf, alternative="two-sided", vectorized=True)
    assert p == pytest.approx(ref.pvalue, abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 4, 5, 6, 10])
def test_sign_flip_floor_is_the_smallest_p_any_data_gives(n):
    """Over every sign pattern of distinct magnitudes, the smallest p equals the floor."""
    mags = [0.01 * (k + 1) for k in range(n)]
    smallest = min(stats.sign_flip_p([s * m for s, m in zip(signs, mags)])[0]
                   for signs in itertools.product((1, -1), repeat=n))
    assert stats.sign_flip_floor(n) == pytest.approx(smallest, abs=1e-15) == pytest.approx(min(1.0, 2 / 2 ** n))
    # past the exact limit the Monte-Carlo p counts the observed pattern once among the draws
    n = stats.EXACT_SIGN_FLIP_MAX + 5
    assert stats.sign_flip_floor(n) == 1 / (stats._MC_DRAWS + 1) == \
        stats.sign_flip_p([0.01 * (k + 1) for k in range(n)])[0]


def test_sign_flip_extremes_and_ties():
    # all ten differences positive: only the observed pattern and its mirror are as extreme
    p, _ = stats.sign_flip_p([0.01 * (k + 1) for k in range(10)])
    assert p == pytest.approx(2 / 1024)
    # equal magnitudes: ties are counted (with float noise) as at least as extreme
    assert stats.sign_flip_p([0.1, 0.1, 0.1, -0.1])[0] == pytest.approx(_naive_sign_flip([1, 1, 1, -1]))
    assert stats.sign_flip_p([0.0, 0.0])[0] == 1.0
    assert stats.sign_flip_p([]) == (1.0, True)
    # past the exact limit: Monte-Carlo, marked as such. With equal magnitudes the statistic
    # counts positive signs, so the exact p is binomial: 16 of 25 positive
    n = stats.EXACT_SIGN_FLIP_MAX + 5
    d = np.full(n, 0.01)
    d[::3] *= -1
    positives = int((d > 0).sum())
    p, exact = stats.sign_flip_p(d)
    assert not exact and p == pytest.approx(2 * sps.binom.sf(positives - 1, n, 0.5), abs=0.005)


def _naive_holm(ps: list[float]) -> list[float]:
    """Holm (1979) by its definition: reject H_(1..k) while p_(k) <= alpha / (m - k + 1); the
    adjusted p of H_i is the smallest alpha at which H_i is rejected (1 when none <= 1 is)."""
    m = len(ps)
    grid = sorted({min(1.0, p * j) for p in ps for j in range(1, m + 1)} | {1.0})
    out = []
    for i in range(m):
        for alpha in grid:
            order = sorted(range(m), key=lambda j: ps[j])
            rejected = set()
            for rank, j in enumerate(order):
                if ps[j] <= alpha / (m - rank) + 1e-15:
                    rejected.add(j)
                else:
                    break
            if i in rejected:
                out.append(alpha)
                break
        else:
            out.append(1.0)
    return out


def test_holm_matches_its_definition():
    rng = np.random.default_rng(0)
    for m in (1, 2, 3, 5, 8):
        for _ in range(20):
            ps = rng.choice([0.001, 0.004, 0.01, 0.02, 0.03, 0.2, 0.5, 0.9], size=m).tolist()
            got = stats.holm({f"h{i}": p for i, p in enumerate(ps)})
            assert [got[f"h{i}"] for i in range(m)] == pytest.approx(_naive_holm(ps), abs=1e-12), ps
    # a None p-value (contrast not measured) is kept and not counted in the family
    assert stats.holm({"a": 0.01, "b": None, "c": 0.04}) == pytest.approx({"a": 0.02, "b": None, "c": 0.04})


def test_holm_is_monotone_and_never_below_the_raw_p():
    ps = {"x": 0.04, "y": 0.01, "z": 0.03, "w": 0.5}
    adj = stats.holm(ps)
    assert adj == pytest.approx({"y": 0.04, "z": 0.09, "x": 0.09, "w": 0.5})
    assert all(adj[k] >= ps[k] for k in ps)


def test_paired_difference_t_interval_and_sign_flip():
    base = {0: 0.50, 1: 0.52, 2: 0.47, 3: 0.55, 4: 0.49, 9: 0.1}
    treated = {0: 0.56, 1: 0.55, 2: 0.52, 3: 0.56, 4: 0.57}
    d = stats.paired_difference(base, treated)
    diffs = [treated[s] - base[s] for s in range(5)]
    lo, hi = sps.t.interval(0.95, 4, loc=np.mean(diffs), scale=sps.sem(diffs))
    assert d["n"] == 5 and d["seeds"] == [0, 1, 2, 3, 4] and (d["up"], d["down"]) == (5, 0)
    assert d["mean"] == pytest.approx(np.mean(diffs)) and d["sd"] == pytest.approx(np.std(diffs, ddof=1))
    assert d["ci"] == pytest.approx((lo, hi), abs=1e-9)
    assert d["p"] == pytest.approx(2 / 32) and d["p_exact"]
    one = stats.paired_difference({0: 0.5}, {0: 0.6})
    assert one["ci"] is None and one["sd"] is None and one["mean"] == pytest.approx(0.1) and one["p"] == 1.0
    none = stats.paired_difference({0: 0.5}, {1: 0.6})
    assert none["n"] == 0 and none["p"] is None and none["mean"] is None


def test_tost_matches_two_one_sided_scipy_t_tests():
    rng = np.random.default_rng(3)
    for _ in range(10):
        d = rng.normal(rng.uniform(-0.02, 0.02), 0.01, 10)
        res = stats.tost(d, 0.02)
        lower = sps.ttest_1samp(d, -0.02, alternative="greater").pvalue
        upper = sps.ttest_1samp(d, 0.02, alternative="less").pvalue
        assert res["p_lower"] == pytest.approx(lower, rel=1e-8)
        assert res["p_upper"] == pytest.approx(upper, rel=1e-8)
        assert res["p"] == pytest.approx(max(lower, upper), rel=1e-8)
        # TOST at 5% accepts exactly the margins beyond the 90% interval
        bound = stats.equivalence_bound(d)
        lo, hi = sps.t.interval(0.90, 9, loc=d.mean(), scale=sps.sem(d))
        assert bound == pytest.approx(max(abs(lo), abs(hi)), rel=1e-9)
        assert stats.tost(d, bound * 1.001)["p"] < 0.05 < stats.tost(d, bound * 0.999)["p"]
    assert stats.tost([0.1], 0.2)["p"] is None


def test_minimal_detectable_effect_has_the_stated_power():
    """At the MDE, the exact power of the two-sided paired t-test (noncentral t) is ~80%."""
    for n, sd in ((5, 0.03), (10, 0.02), (20, 0.01), (40, 0.05)):
        mde = stats.minimal_detectable_effect(sd, n)
        df, crit = n - 1, sps.t.ppf(0.975, n - 1)
        nc = mde / (sd / math.sqrt(n))
        power = sps.nct.sf(crit, df, nc) + sps.nct.cdf(-crit, df, nc)
        assert power == pytest.approx(0.80, abs=0.02), (n, power)
    assert stats.minimal_detectable_effect(None, 10) is None
    assert stats.minimal_detectable_effect(0.02, 1) is None
    # more pairs, smaller detectable effect; a stricter level, larger
    assert stats.minimal_detectable_effect(0.02, 20) < stats.minimal_detectable_effect(0.02, 10)
    assert stats.minimal_detectable_effect(0.02, 10, alpha=0.01) > stats.minimal_detectable_effect(0.02, 10)
