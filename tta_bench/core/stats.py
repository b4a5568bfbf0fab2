"""Significance tests for TTA comparisons (docs/DESIGN.md §5), following Demšar (JMLR 2006).

Per configuration: exact McNemar on paired per-sample correctness. Across configurations, one
method vs the source model: sign test, t-test, Wilcoxon signed-rank, BCa bootstrap CI of the mean
Δacc. Method A vs B: paired t-test and Wilcoxon. Holm across a family; Friedman + Nemenyi
critical difference for >= 3 methods. All tests are one-sided towards "improves"."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


def mcnemar_exact(n_fixed: int, n_broken: int) -> float:
    """Exact one-sided McNemar p-value for 'adaptation fixes more than it breaks'."""
    return sign_test(n_fixed, n_broken)


def sign_test(n_pos: int, n_neg: int) -> float:
    """P(X >= n_pos), X ~ Binomial(n_pos + n_neg, 1/2); ties are left out. 1.0 without data."""
    n = n_pos + n_neg
    return 1.0 if n == 0 else float(stats.binomtest(n_pos, n, 0.5, alternative="greater").pvalue)


def ttest_greater(d: np.ndarray) -> float:
    """One-sample t-test of mean(d) > 0 (NaN when it is undefined: n < 2 or no spread)."""
    d = np.asarray(d, dtype=float)
    if len(d) < 2 or np.ptp(d) == 0:
        return float("nan")
    return float(stats.ttest_1samp(d, 0.0, alternative="greater").pvalue)


def wilcoxon_greater(d: np.ndarray) -> float:
    """Wilcoxon signed-rank test of median(d) > 0. Zero differences split their ranks evenly
    between the two sums (Demšar 2006, §3.1.3). 1.0 when every difference is zero."""
    d = np.asarray(d, dtype=float)
    if not np.any(d != 0):
        return 1.0
    return float(stats.wilcoxon(d, zero_method="zsplit", alternative="greater").pvalue)


def bootstrap_ci(d: np.ndarray, confidence: float = 0.95, n_resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """BCa bootstrap confidence interval of the mean (NaN when n < 3 or no spread)."""
    d = np.asarray(d, dtype=float)
    if len(d) < 3 or np.ptp(d) == 0:
        return float("nan"), float("nan")
    ci = stats.bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                         method="BCa", rng=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)


@dataclass
class VersusSource:
    """One method's Δacc over configurations against the source model (Δacc = 0)."""

    n: int
    mean: float
    std: float
    n_pos: int
    n_neg: int
    p_sign: float
    p_t: float
    p_wilcoxon: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict:
        return asdict(self)


def versus_source(deltas, confidence: float = 0.95, seed: int = 0) -> VersusSource:
    d = np.asarray(deltas, dtype=float)
    n_pos, n_neg = int((d > 0).sum()), int((d < 0).sum())
    low, high = bootstrap_ci(d, confidence, seed=seed)
    return VersusSource(
        n=len(d), mean=float(d.mean()) if len(d) else float("nan"),
        std=float(d.std(ddof=1)) if len(d) > 1 else float("nan"), n_pos=n_pos, n_neg=n_neg,
        p_sign=sign_test(n_pos, n_neg), p_t=ttest_greater(d), p_wilcoxon=wilcoxon_greater(d),
        ci_low=low, ci_high=high)


def paired(a, b) -> tuple[float, float]:
    """(paired t-test, Wilcoxon) p-values of 'A > B' on the same configurations."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return ttest_greater(diff), wilcoxon_greater(diff)


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error); NaNs stay NaN, outside the family."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = adjusted
    return out


@dataclass
class Friedman:
    statistic: float
    p: float
    avg_ranks: np.ndarray  # per method; 1 = best (largest Δacc)
    cd: float  # Nemenyi critical difference of average ranks at alpha


def friedman(scores: np.ndarray, alpha: float = 0.05) -> Friedman:
    """scores: [n_configurations, k_methods], larger is better (k >= 3)."""
    scores = np.asarray(scores, dtype=float)
    n, k = scores.shape
    if k < 3 or n < 2:
        raise ValueError(f"the Friedman test needs >= 3 methods and >= 2 configurations, got {k} and {n}")
    ranks = np.vstack([stats.rankdata(-row) for row in scores])
    statistic, p = stats.friedmanchisquare(*scores.T)
    return Friedman(float(statistic), float(p), ranks.mean(axis=0), critical_difference(k, n, alpha))


def critical_difference(k: int, n: int, alpha: float = 0.05) -> float:
    """Nemenyi CD = q_alpha · sqrt(k(k+1) / 6N), q_alpha = studentized range / sqrt(2)."""
    q = stats.studentized_range.ppf(1 - alpha, k, np.inf) / np.sqrt(2)
    return float(q * np.sqrt(k * (k + 1) / (6 * n)))
