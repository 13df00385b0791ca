"""Confidence intervals and paired tests over the images of an evaluation.

Per-image scores to FP (PSNR, SSIM, LPIPS) come with a percentile-bootstrap 95% interval of their mean, and two
methods evaluated on the same images (same prompts and seeds) are compared image by image: the mean paired
difference with a paired-bootstrap 95% interval, and a two-sided Wilcoxon signed-rank p-value.

The unit of resampling is the prompt: a resample draws prompts with replacement and keeps all images of each
drawn prompt (with one image per prompt, the default, that is the ordinary bootstrap over images). Images of one
prompt under different seeds are not independent, so resampling them one by one would make the interval too
narrow. For the same reason the Wilcoxon test runs on per-prompt mean differences (one pair per prompt).

Every resampling is seeded (`BOOTSTRAP_SEED`) so that a rerun, or a resumed run, reports identical intervals."""
from __future__ import annotations

import numpy as np
import scipy.stats

N_RESAMPLES = 2000  # resamples per interval: the 2.5% / 97.5% percentiles move by < 1% of the width between seeds
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0
_CHUNK = 2**22  # at most this many drawn indices at a time (about 32 MiB), whatever the image count

DESCRIPTION = {
    "confidence": CONFIDENCE, "n_resamples": N_RESAMPLES, "seed": BOOTSTRAP_SEED,
    "interval": "percentile bootstrap of the mean, resampling prompts (all images of a drawn prompt together)",
    "paired_test": "Wilcoxon signed-rank, two-sided, on per-prompt mean differences (zero differences dropped); "
                   "exact for up to 50 non-zero pairs, else the normal approximation with tie correction (scipy)",
}


def _as_values(values, what: str = "values") -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D sequence, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{what} hold {int(np.sum(~np.isfinite(v)))} non-finite entries (of {v.size})")
    return v


def _group_ids(n: int, groups) -> np.ndarray:
    """Dense ids 0..G-1 of each value's group (its prompt); None: every value its own group."""
    if groups is None:
        return np.arange(n)
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups has shape {g.shape}, the values ({n},)")
    return np.unique(g, return_inverse=True)[1].reshape(-1)


def bootstrap_means(values, groups=None, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """The mean of `values` in each of `n_resamples` resamples that draw the groups (prompts) with replacement;
    a resample's mean is over all values of its drawn groups."""
    v = _as_values(values)
    if n_resamples < 1:
        raise ValueError(f"n_resamples {n_resamples} must be >= 1")
    ids = _group_ids(v.size, groups)
    sums, counts = np.bincount(ids, weights=v), np.bincount(ids).astype(np.float64)
    n_groups = sums.size
    rng = np.random.default_rng(seed)
    out = np.empty(n_resamples)
    step = max(1, _CHUNK // n_groups)
    for start in range(0, n_resamples, step):
        stop = min(start + step, n_resamples)
        draw = rng.integers(0, n_groups, size=(stop - start, n_groups))
        out[start:stop] = sums[draw].sum(1) / counts[draw].sum(1)
    return out


def mean_ci(values, groups=None, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
            seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and its percentile-bootstrap interval."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} must be in (0, 1)")
    v = _as_values(values)
    boot = bootstrap_means(v, groups, n_resamples, seed)
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return float(v.mean()), float(lo), float(hi)


def wilcoxon_signed_rank(diff) -> dict:
    """Two-sided Wilcoxon signed-rank test of paired differences `diff` against 0: zeros are dropped (Wilcoxon's
    convention); all zero (identical methods) gives p = 1. Returns {"statistic", "p", "n_nonzero"}."""
    d = _as_values(diff, "paired differences")
    nonzero = d[d != 0]
    if nonzero.size == 0:
        return {"statistic": 0.0, "p": 1.0, "n_nonzero": 0}
    res = scipy.stats.wilcoxon(nonzero, zero_method="wilcox", alternative="two-sided", method="auto")
    return {"statistic": float(res.statistic), "p": float(res.pvalue), "n_nonzero": int(nonzero.size)}


def per_group_means(values, groups) -> np.ndarray:
    v = _as_values(values)
    ids = _group_ids(v.size, groups)
    return np.bincount(ids, weights=v) / np.bincount(ids)


def paired_difference(a, b, groups=None, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                      seed: int = BOOTSTRAP_SEED) -> dict:
    """a - b on the same images (a[i] and b[i] score the same prompt and seed): the mean difference, its
    paired-bootstrap interval (resampling prompts) and the Wilcoxon p-value on per-prompt mean differences."""
    a, b = _as_values(a, "first method's values"), _as_values(b, "second method's values")
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same images: {a.size} against {b.size}")
    d = a - b
    mean, lo, hi = mean_ci(d, groups, n_resamples, confidence, seed)
    test = wilcoxon_signed_rank(per_group_means(d, groups) if groups is not None else d)
    n_groups = int(np.unique(groups).size) if groups is not None else int(d.size)
    return {"mean_diff": mean, "ci_low": lo, "ci_high": hi, "p_wilcoxon": test["p"],
            "n_images": int(d.size), "n_prompts": n_groups}


def verdict(paired: dict, margin: float, alpha: float = 0.05, higher_is_better: bool = True) -> str:
    """Two-sided reading of a `paired_difference` (a - b): "better" or "worse" when the Wilcoxon p is below
    `alpha` and the mean difference points that way; "equal" when the interval contains 0 and lies within
    +-`margin` (equivalence at that margin, so a wide interval is never read as equal); else "inconclusive"."""
    if not margin > 0:
        raise ValueError(f"margin={margin} must be > 0: equal quality is a difference within +-margin")
    sign = 1.0 if higher_is_better else -1.0
    if paired["p_wilcoxon"] < alpha and paired["mean_diff"] != 0:
        return "better" if sign * paired["mean_diff"] > 0 else "worse"
    if paired["ci_low"] <= 0 <= paired["ci_high"] and -margin <= paired["ci_low"] and paired["ci_high"] <= margin:
        return "equal"
    return "inconclusive"
