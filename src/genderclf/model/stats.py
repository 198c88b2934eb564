"""Uncertainty and paired comparisons, from the field's statistics libraries.

* intervals for test metrics: SciPy's `bootstrap` (seeded, percentile) over the test split;
* an interval for a slice's accuracy: statsmodels' Wilson score interval;
* two models on the same test images: statsmodels' exact McNemar test on their per-image
  correctness, and a paired bootstrap interval for the accuracy difference;
* calibration: Platt scaling (a logistic regression on the model's logit) fitted on the
  validation split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Z95 = 0.95


def _interval(res: Any) -> list[float] | None:
    lo, hi = res.confidence_interval
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return None
    return [float(lo), float(hi)]


def bootstrap_ci(
    statistic, arrays: tuple[np.ndarray, ...], samples: int, seed: int, level: float = Z95
) -> list[float] | None:
    """A percentile bootstrap interval of `statistic(*arrays)`, the arrays resampled
    together (paired). None when it is undefined (e.g. one class only)."""
    import warnings

    from scipy.stats import DegenerateDataWarning, bootstrap

    if len(arrays[0]) < 2:
        return None
    # A tiny or one-class test split gives a degenerate resampling distribution: the
    # interval is then a point (or None), which is the honest answer, not a warning.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateDataWarning)
        res = bootstrap(
            arrays,
            statistic,
            paired=True,
            vectorized=False,
            n_resamples=samples,
            confidence_level=level,
            method="percentile",
            random_state=np.random.default_rng(seed),
        )
    return _interval(res)


def metric_intervals(
    y: np.ndarray, p: np.ndarray, threshold: float, samples: int, seed: int
) -> dict[str, list[float] | None]:
    """95% bootstrap intervals of test accuracy, F1 and ROC-AUC."""
    from sklearn.metrics import f1_score, roc_auc_score

    pred = (p >= threshold).astype(int)

    def auc(yy, pp):
        return roc_auc_score(yy, pp) if len(np.unique(yy)) > 1 else np.nan

    return {
        "accuracy": bootstrap_ci(lambda a, b: np.mean(a == b), (y, pred), samples, seed),
        "f1": bootstrap_ci(lambda a, b: f1_score(a, b, zero_division=0), (y, pred), samples, seed),
        "roc_auc": bootstrap_ci(auc, (y, p), samples, seed),
    }


def wilson(successes: int, n: int, level: float = Z95) -> list[float] | None:
    """The Wilson score interval of a proportion (statsmodels), holding the proportion
    itself: at 157/157 statsmodels' upper bound is 0.9999999999999999, below 1.0."""
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return None
    lo, hi = proportion_confint(successes, n, alpha=1 - level, method="wilson")
    p = successes / n
    return [min(float(lo), p), max(float(hi), p)]


@dataclass(frozen=True)
class Paired:
    """Two models' per-image correctness on the same test images."""

    n: int
    both_right: int
    only_a: int  # the candidate right, the champion wrong
    only_b: int  # the champion right, the candidate wrong
    both_wrong: int
    difference: float  # accuracy(a) - accuracy(b)
    interval: list[float] | None  # paired bootstrap, 95%
    p_value: float  # exact McNemar (two-sided binomial test on the discordant pairs)


def paired_comparison(
    correct_a: np.ndarray, correct_b: np.ndarray, samples: int, seed: int
) -> Paired:
    """McNemar's exact test and the accuracy difference with its interval."""
    from statsmodels.stats.contingency_tables import mcnemar

    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    table = [[int((a & b).sum()), int((a & ~b).sum())], [int((~a & b).sum()), int((~a & ~b).sum())]]
    test = mcnemar(table, exact=True)
    diff = a.astype(float) - b.astype(float)
    interval = bootstrap_ci(lambda d: np.mean(d), (diff,), samples, seed)
    return Paired(
        len(a),
        table[0][0],
        table[0][1],
        table[1][0],
        table[1][1],
        float(diff.mean()),
        interval,
        float(test.pvalue),
    )


# --- calibration ---------------------------------------------------------------------------------


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


@dataclass(frozen=True)
class Platt:
    """Calibrated P(male) = sigmoid(a * logit(p) + b)."""

    a: float = 1.0
    b: float = 0.0

    def apply(self, p: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.a * _logit(p) + self.b)))

    def raw_threshold(self, cut: float = 0.5) -> float:
        """The raw score at which the calibrated probability is `cut`."""
        if self.a <= 0:  # a model that ranks backwards: no monotone cut; keep the plain one
            return cut
        z = (np.log(cut / (1 - cut)) - self.b) / self.a
        return float(1.0 / (1.0 + np.exp(-z)))


def fit_platt(y: np.ndarray, p: np.ndarray) -> Platt:
    """Platt scaling fitted on (validation) labels and scores: two parameters, so it
    holds on a few hundred images where a threshold picked by max-F1 chases noise."""
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y)) < 2:
        return Platt()
    lr = LogisticRegression(C=1e6, max_iter=1000).fit(_logit(p).reshape(-1, 1), y)
    return Platt(float(lr.coef_[0, 0]), float(lr.intercept_[0]))
