"""The two-sample tests of `genderclf drift`, on plain arrays (numpy and scipy only).

Three views, each tested at `drift.alpha`:

* **image statistics** (size, brightness, contrast, saturation, colour): one Kolmogorov-
  Smirnov test per feature, Bonferroni-corrected over the features. KS needs no binning
  and no distributional assumption, and a per-feature test says *what* changed.
* **embeddings** (the champion's pooled layer): the maximum mean discrepancy (MMD) with a
  Gaussian (RBF) kernel, its bandwidth the median pairwise distance (median heuristic),
  and a seeded permutation test. Why MMD: the embeddings have hundreds of dimensions and
  a few hundred samples, where per-dimension tests lose power to the multiple-testing
  correction and density estimates do not work; MMD with a characteristic kernel is zero
  only for equal distributions, uses every dimension at once, and the permutation test
  gives an exact false-alarm rate at any sample size (Gretton et al., JMLR 2012).
* **predictions**: the predicted male fraction (two-proportion z-test, and an effect-size
  floor `drift.max_male_fraction_delta`, so a large batch does not alarm on a trivial
  shift) and the mean confidence of the predicted label (a drop of more than
  `drift.max_confidence_drop` that a one-sided Welch t-test finds significant: on a
  reference of a dozen images the mean alone moves that much by chance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FeatureTest:
    name: str
    statistic: float  # KS D: the largest gap between the two empirical CDFs
    p_value: float
    reference_median: float
    batch_median: float
    drifted: bool


def ks_per_feature(
    reference: np.ndarray, batch: np.ndarray, names: list[str], alpha: float
) -> list[FeatureTest]:
    """A two-sample KS test per column, each at alpha / columns (Bonferroni).

    Args:
        reference, batch: (n, k) and (m, k) arrays, one column per feature in `names`.
    """
    from scipy.stats import ks_2samp

    level = alpha / len(names)
    out = []
    for j, name in enumerate(names):
        a, b = reference[:, j].astype(np.float64), batch[:, j].astype(np.float64)
        if np.array_equal(np.unique(a), np.unique(b)) and len(np.unique(a)) == 1:
            d, p = 0.0, 1.0  # the same constant on both sides (e.g. every image 178x218)
        else:
            r = ks_2samp(a, b)
            d, p = float(r.statistic), float(r.pvalue)
        out.append(FeatureTest(name, d, p, float(np.median(a)), float(np.median(b)), p < level))
    return out


def _sq_distances(z: np.ndarray) -> np.ndarray:
    sq = np.einsum("ij,ij->i", z, z)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), 0.0)


def _mmd2(k: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 from the pooled kernel matrix for index sets x and y."""
    n, m = len(x), len(y)
    kxx, kyy, kxy = k[np.ix_(x, x)], k[np.ix_(y, y)], k[np.ix_(x, y)]
    return float(
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2.0 * kxy.mean()
    )


@dataclass(frozen=True)
class MMDTest:
    statistic: float  # unbiased MMD^2
    p_value: float
    bandwidth: float  # the RBF kernel's sigma (median heuristic)
    null: np.ndarray  # MMD^2 under the permutations
    drifted: bool


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int, alpha: float, seed: int) -> MMDTest:
    """MMD two-sample test with an RBF kernel and a permutation null.

    The bandwidth is the median distance between distinct points of the pooled sample
    (computed once, before permuting, so every permutation uses the same kernel). The
    p-value counts the observed statistic as one of the permutations, (1 + #{null >=
    observed}) / (1 + permutations), which keeps the false-alarm rate at most alpha.

    Raises:
        ValueError: fewer than two points on a side, or different dimensions.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or len(y) < 2 or x.shape[1:] != y.shape[1:]:
        raise ValueError(
            f"MMD needs two samples of >= 2 points of one dimension, got {x.shape} and {y.shape}"
        )
    z = np.concatenate([x.reshape(len(x), -1), y.reshape(len(y), -1)])
    d2 = _sq_distances(z)
    off = d2[np.triu_indices(len(z), 1)]
    med = float(np.median(off[off > 0])) if (off > 0).any() else 1.0
    k = np.exp(-d2 / (2.0 * med))  # sigma^2 = median squared distance
    n = len(x)
    idx = np.arange(len(z))
    observed = _mmd2(k, idx[:n], idx[n:])
    rng = np.random.default_rng(seed)
    null = np.empty(permutations)
    for i in range(permutations):
        perm = rng.permutation(len(z))
        null[i] = _mmd2(k, perm[:n], perm[n:])
    p = (1.0 + float((null >= observed).sum())) / (1.0 + permutations)
    return MMDTest(observed, p, float(np.sqrt(med)), null, p < alpha)


def two_proportions(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """(p2 - p1, two-sided p-value of the pooled two-proportion z-test)."""
    from scipy.stats import norm

    p1, p2 = k1 / n1, k2 / n2
    pooled = (k1 + k2) / (n1 + n2)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return p2 - p1, 1.0 if p1 == p2 else 0.0
    return p2 - p1, float(2 * norm.sf(abs(p2 - p1) / se))


def mean_drop(reference: np.ndarray, batch: np.ndarray) -> tuple[float, float]:
    """(mean(reference) - mean(batch), one-sided Welch t-test p-value that the batch's mean
    is lower)."""
    from scipy.stats import ttest_ind

    a, b = np.asarray(reference, dtype=np.float64), np.asarray(batch, dtype=np.float64)
    drop = float(a.mean() - b.mean())
    if a.std() == 0 and b.std() == 0:
        return drop, 0.0 if drop > 0 else 1.0
    return drop, float(ttest_ind(a, b, equal_var=False, alternative="greater").pvalue)
