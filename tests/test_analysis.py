"""The replicate analysis (lord_ops/analysis.py) against scipy and hand computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from lord_ops import analysis as A


def test_paired_interval_and_effect_size_match_scipy_and_hand_values():
    x = [0.31, 0.29, 0.35, 0.40, 0.28, 0.33, 0.37]
    y = [0.30, 0.25, 0.30, 0.33, 0.29, 0.27, 0.31]
    s = A.paired(x, y)
    d = np.subtract(x, y)
    assert s.n == 7 and s.mean == pytest.approx(d.mean()) and s.sd == pytest.approx(d.std(ddof=1))
    ci = stats.ttest_rel(x, y).confidence_interval(0.95)
    assert (s.ci_low, s.ci_high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert s.d_z == pytest.approx(d.mean() / d.std(ddof=1))
    # a hand value: differences 1, 2, 3 -> mean 2, sd 1, t(0.975, 2) = 4.302652729...
    h = A.describe([1.0, 2.0, 3.0])
    assert (h.ci_low, h.ci_high) == (pytest.approx(2 - 4.302652729749464 / math.sqrt(3)),
                                     pytest.approx(2 + 4.302652729749464 / math.sqrt(3)))
    assert h.d_z == pytest.approx(2.0)


def test_sign_flip_p_is_exact_and_matches_scipys_paired_permutation_test():
    x = [3.1, 2.4, 2.9, 3.3, 2.2, 2.8, 3.6, 2.5]
    y = [2.9, 2.5, 2.1, 2.8, 2.3, 2.2, 3.0, 2.4]
    s = A.paired(x, y)
    ref = stats.permutation_test((x, y), lambda a, b, axis: np.mean(a - b, axis=axis), permutation_type="samples",
                                 n_resamples=np.inf, alternative="two-sided", vectorized=True)
    assert s.p == pytest.approx(ref.pvalue) and s.p_method.startswith("exact (256")
    # by hand: all of 4 differences positive and equal -> only the observed pattern and its mirror reach it
    assert A.sign_flip_p([1.0, 1.0, 1.0, 1.0])[0] == pytest.approx(2 / 16)
    assert A.sign_flip_p([0.0, 0.0, 0.0])[0] == 1.0


def test_monte_carlo_p_above_the_exact_limit_is_close_to_the_exact_value():
    rng = np.random.default_rng(3)
    d = rng.normal(0.3, 1.0, size=A.EXACT_MAX + 2)
    p_mc, how = A.sign_flip_p(d, permutations=100_000, seed=1)
    assert how.startswith("Monte Carlo")
    ref = stats.permutation_test((d,), lambda a, axis: np.mean(a, axis=axis), permutation_type="samples",
                                 n_resamples=100_000, alternative="two-sided", vectorized=True, random_state=2)
    assert abs(p_mc - ref.pvalue) < 0.01


def test_holm_by_hand():
    adj = A.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.20})
    # sorted: a 0.01 x4 = 0.04; c 0.03 x3 = 0.09; b 0.04 x2 = 0.08 -> max(0.09, 0.08) = 0.09; d 0.20 x1 -> 0.20
    assert adj == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.20})
    family = {"x": A.describe([1, 2, 3, 4.0]), "y": A.describe([0.1, -0.2, 0.3, 0.0])}
    A.apply_holm(family)
    assert family["x"].p_holm == pytest.approx(min(1.0, 2 * family["x"].p))
    assert family["y"].p_holm >= family["y"].p


def test_ratio_of_means_and_its_bootstrap_interval():
    r = A.ratio_of_means([1.0, 2.0, 3.0, 2.0], [2.0, 4.0, 6.0, 4.0], resamples=2000)
    assert r["value"] == pytest.approx(0.5) and r["ci_low"] == pytest.approx(0.5) and r["ci_high"] == pytest.approx(0.5)
    r = A.ratio_of_means([1.0, 0.0, 2.0, 1.5, 0.5], [2.0, 1.0, 2.5, 2.0, 1.5], resamples=4000, seed=3)
    assert r["ci_low"] < r["value"] < r["ci_high"]


def test_required_replicates_matches_the_standard_power_table():
    # paired t test, two-sided alpha 0.05, power 0.8: d 0.5 -> 34 pairs, d 0.8 -> 15 (G*Power's values)
    assert A.required_replicates(0.5) == 34
    assert A.required_replicates(0.8) == 15
    assert A.required_replicates(0.0) is None


def test_alignment_pairs_by_replicate_and_refuses_bad_input():
    reps, (a, b) = A.aligned({0: 1.0, 1: 2.0, 3: 4.0}, {1: 5.0, 3: 6.0, 4: 7.0})
    assert reps == [1, 3] and a == [2.0, 4.0] and b == [5.0, 6.0]
    with pytest.raises(ValueError, match="given twice"):
        A.per_replicate([(0, 1.0), (0, 2.0)])
    with pytest.raises(ValueError, match="same replicates"):
        A.paired([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        A.describe([1.0, float("nan")])


def test_crossed_interval_reduces_to_the_replicate_interval_when_the_items_agree():
    """When every held-out item gives the same difference within a replicate there is nothing to learn from other
    items: the interval is the replicates' Student-t interval (df = R - 1); a hand case for the mean squares."""
    rows = np.array([0.010, 0.014, 0.007, 0.012, 0.009])
    d = np.repeat(rows[:, None], 6, axis=1)
    c = A.crossed_interval(d)
    mean, _, low, high = A.mean_interval(rows)
    assert c["mean"] == pytest.approx(mean) and (c["ci_low"], c["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert c["df"] == pytest.approx(4) and c["item_share"] == pytest.approx(0, abs=1e-12)
    assert c["se_crossed"] == pytest.approx(c["se_replicates"])
    # 2 x 2 by hand: [[1, 3], [2, 6]]: grand 3, rows 2 / 4, columns 1.5 / 4.5; ms_r = 2 * 2 = 4, ms_i = 2 * 4.5 = 9,
    # residuals +-0.5 -> ms_e = 1; var = (4 + 9 - 1) / 4 = 3; df = 12^2 / (16 + 81 + 1)
    h = A.crossed_interval([[1.0, 3.0], [2.0, 6.0]])
    assert h["se_crossed"] == pytest.approx(math.sqrt(3)) and h["se_replicates"] == pytest.approx(1.0)
    assert h["df"] == pytest.approx(144 / 98) and h["item_share"] == pytest.approx(8 / 12)
    assert h["p"] == pytest.approx(2 * stats.t.sf(math.sqrt(3), 144 / 98)) and h["p"] == pytest.approx(0.26817, abs=1e-5)
    assert h["ci_high"] == pytest.approx(3 + stats.t.ppf(0.975, 144 / 98) * math.sqrt(3))
    with pytest.raises(ValueError, match="at least 2"):
        A.crossed_interval([[1.0, 2.0, 3.0]])


def test_crossed_interval_covers_the_mean_over_new_items_where_the_replicate_interval_does_not():
    """Simulated crossed designs (8 replicates x 32 items, as the held-out loss): with a real item effect the
    replicates-only interval misses the population mean far more often than 5%, the crossed one about 5%."""
    rng = np.random.default_rng(3)
    hits_crossed = hits_reps = 0
    trials = 1500
    for _ in range(trials):
        d = (0.5 + rng.normal(0, 0.3, (8, 1)) + rng.normal(0, 1.0, (1, 32)) + rng.normal(0, 0.5, (8, 32)))
        c = A.crossed_interval(d)
        hits_crossed += c["ci_low"] <= 0.5 <= c["ci_high"]
        _, _, low, high = A.mean_interval(d.mean(axis=1))
        hits_reps += low <= 0.5 <= high
        assert c["se_crossed"] >= c["se_replicates"]  # the images only add variance (the df may still differ)
    assert 0.92 <= hits_crossed / trials <= 0.98
    assert hits_reps / trials < 0.80
