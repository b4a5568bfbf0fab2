"""Statistics against hand-computed and textbook values (Demšar 2006; Holm 1979)."""
import math

import numpy as np
import pytest

from tta_bench.core import stats


def test_sign_test_and_mcnemar_are_the_exact_binomial_tail():
    assert stats.sign_test(8, 2) == pytest.approx(56 / 1024)  # P(X >= 8), X ~ Bin(10, 1/2)
    assert stats.sign_test(0, 3) == pytest.approx(1.0)
    assert stats.sign_test(0, 0) == 1.0  # no evidence either way
    assert stats.mcnemar_exact(5, 0) == pytest.approx(1 / 32)


def test_t_test_matches_the_closed_form_for_two_degrees_of_freedom():
    # d = 1, 2, 3: mean 2, sd 1, t = 2·sqrt(3); for df = 2, P(T > t) = (1 − t / sqrt(2 + t²)) / 2
    t = 2 * math.sqrt(3)
    assert stats.ttest_greater(np.array([1.0, 2.0, 3.0])) == pytest.approx((1 - t / math.sqrt(2 + t * t)) / 2)
    assert math.isnan(stats.ttest_greater(np.array([1.0, 1.0])))  # no spread: undefined


def test_wilcoxon_exact_distribution_and_zero_splitting():
    assert stats.wilcoxon_greater(np.array([1, 2, 3, 4, 5.0])) == pytest.approx(1 / 32)  # W+ = 15
    # W+ = 10 of 15: P(W+ >= 10) = #{subsets of 1..5 with sum <= 5} / 32 = 10 / 32
    assert stats.wilcoxon_greater(np.array([1, 2, 3, 4, -5.0])) == pytest.approx(10 / 32)
    assert stats.wilcoxon_greater(np.zeros(4)) == 1.0
    from scipy.stats import wilcoxon  # Demšar: a zero's rank is split between the sums
    assert wilcoxon([0, 2, 3, 4, 5, 6.0], zero_method="zsplit").statistic == pytest.approx(0.5)  # W− = 1/2
    assert stats.wilcoxon_greater(np.array([0, 2, 3, 4, 5, 6.0])) < stats.wilcoxon_greater(np.array([0, 0, 3, 4, 5, 6.0]))


def test_holm_textbook_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4·0.005, 3·0.01, 2·0.03, max(1·0.04, 0.06)
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    out = stats.holm([0.5, np.nan, 0.9])
    assert math.isnan(out[1]) and out[0] == pytest.approx(1.0) and out[2] == pytest.approx(1.0)


def test_friedman_and_critical_difference():
    # 3 methods ranked 1, 2, 3 on each of 4 configurations:
    # χ²_F = 12N/(k(k+1)) · (ΣR² − k(k+1)²/4) = 4 · (14 − 12) = 8, p = exp(−8/2) (χ², 2 df)
    scores = np.array([[3, 2, 1], [5, 4, 0], [9, 1, 0.5], [2, 1.5, 1.0]])
    result = stats.friedman(scores)
    assert result.statistic == pytest.approx(8.0)
    assert result.p == pytest.approx(math.exp(-4))
    np.testing.assert_allclose(result.avg_ranks, [1, 2, 3])
    # Demšar (2006) §3.2.2: k = 4 classifiers on N = 14 datasets, q_0.05 = 2.569, CD = 1.25
    assert stats.critical_difference(4, 14) == pytest.approx(2.569 * math.sqrt(20 / 84), abs=1e-3)
    assert round(stats.critical_difference(4, 14), 2) == 1.25
    with pytest.raises(ValueError, match=">= 3 methods"):
        stats.friedman(scores[:, :2])


def test_versus_source_summary_and_bca_interval():
    d = np.array([2.0, -1.0, 3.0, 0.0, 4.0])
    vs = stats.versus_source(d)
    assert (vs.n, vs.n_pos, vs.n_neg) == (5, 3, 1)
    assert vs.mean == pytest.approx(1.6) and vs.std == pytest.approx(np.std(d, ddof=1))
    assert vs.p_sign == pytest.approx(5 / 16)  # P(X >= 3), X ~ Bin(4, 1/2); the zero is left out
    # BCa on a large normal sample ≈ mean ± 1.96·s/√n, and reproducible
    x = np.random.default_rng(3).normal(1.0, 2.0, 400)
    low, high = stats.bootstrap_ci(x)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert low == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert high == pytest.approx(x.mean() + half, abs=0.1 * half)
    assert stats.bootstrap_ci(x) == (low, high)


def test_paired_comparison_is_directional():
    a, b = np.array([5.0, 6, 7, 8, 9]), np.array([1.0, 2, 3, 4, 4.5])
    p_t, p_w = stats.paired(a, b)
    assert p_w == pytest.approx(1 / 32) and p_t < 0.001
    assert stats.paired(b, a)[1] == pytest.approx(1.0)
