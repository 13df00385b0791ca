"""The evaluation's statistics (pipeline/evaluation/statistics.py): bootstrap intervals of a mean, paired
differences between methods, the Wilcoxon signed-rank p-value, against references computed another way.
Each test's docstring names a mutation of the code that makes it fail."""
import math

import numpy as np
import pytest
import scipy.stats

from pipeline.evaluation.statistics import bootstrap_means, mean_ci, paired_difference, wilcoxon_signed_rank


def test_bootstrap_interval_holds_the_mean_and_narrows_with_n():
    """The interval contains the sample mean, shrinks like 1/sqrt(n) and matches the normal-theory interval
    mean +- 1.96 s / sqrt(n) at n = 400 (to 10%). Breaks if a resample draws a fixed number of prompts instead
    of n (the width stops shrinking), or if the percentiles are taken at 5/95 instead of 2.5/97.5."""
    rng = np.random.default_rng(1)
    widths = {}
    for n in (25, 100, 400):
        x = rng.normal(30.0, 2.0, n)
        mean, lo, hi = mean_ci(x)
        assert mean == pytest.approx(x.mean()) and lo < mean < hi
        widths[n] = hi - lo
        if n == 400:
            half = 1.96 * x.std(ddof=1) / math.sqrt(n)
            assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert widths[25] > 1.6 * widths[100] > 1.6 ** 2 * widths[400]  # halves per 4x n (sampling noise: 1.6)
    assert mean_ci([3.0]) == (3.0, 3.0, 3.0)  # one image: nothing to resample
    assert mean_ci(x) == mean_ci(x)  # seeded: a rerun reports the same interval


def test_bootstrap_resamples_prompts_not_images():
    """With k images per prompt, the groups (prompts) are resampled whole: the interval equals the one of the
    per-prompt means (equal group sizes), and is wider than resampling the correlated images one by one.
    Breaks if the groups are ignored (every image its own group)."""
    rng = np.random.default_rng(2)
    per_prompt = rng.normal(0.0, 1.0, 50)
    images = np.repeat(per_prompt, 4) + rng.normal(0.0, 0.1, 200)  # 4 seeds of a prompt: nearly the same score
    prompts = np.repeat(np.arange(50), 4)
    grouped = bootstrap_means(images, prompts)
    means_of_prompts = images.reshape(50, 4).mean(1)
    assert np.allclose(grouped, bootstrap_means(means_of_prompts))  # same draws, same means
    _, lo, hi = mean_ci(images, prompts)
    _, lo1, hi1 = mean_ci(images)
    assert hi - lo > 1.6 * (hi1 - lo1)  # ~2x: 50 independent prompts, not 200 independent images


def test_paired_difference_of_a_method_with_itself_is_zero():
    """A method against itself: mean difference 0, interval [0, 0], p = 1; a method shifted by +0.5 dB on every
    image: difference 0.5 with a zero-width interval at 0.5 and p < 0.001. Breaks if b is taken in another
    image order than a (the pairing is lost: a's own spread enters the interval)."""
    rng = np.random.default_rng(3)
    a = rng.normal(28.0, 3.0, 60)
    same = paired_difference(a, a.copy())
    assert (same["mean_diff"], same["ci_low"], same["ci_high"], same["p_wilcoxon"]) == (0.0, 0.0, 0.0, 1.0)
    assert same["n_images"] == same["n_prompts"] == 60
    shifted = paired_difference(a + 0.5, a)
    assert shifted["mean_diff"] == pytest.approx(0.5)
    assert shifted["ci_low"] == pytest.approx(0.5) and shifted["ci_high"] == pytest.approx(0.5)
    assert shifted["p_wilcoxon"] < 1e-3
    noisy = paired_difference(a + rng.normal(0.2, 0.1, 60), a)  # the spread of a itself must not enter
    assert 0.15 < noisy["ci_low"] < noisy["mean_diff"] < noisy["ci_high"] < 0.25
    with pytest.raises(ValueError, match="same images: 60 against 59"):
        paired_difference(a, a[:-1])


def test_wilcoxon_p_matches_hand_computed_values():
    """Exact: 5 positive differences, T- = 0, P = 2 / 2^5 = 0.0625; 4 positive and the smallest negative,
    T- = 1, P = 2 * 2 / 32 = 0.125. Normal approximation with ties for 60 pairs, computed here from the
    formula: z = (T+ - n(n+1)/4) / sqrt(n(n+1)(2n+1)/24 - sum(t^3 - t)/48), p = 2 (1 - Phi(|z|)); zeros are
    dropped first. Breaks if zeros are kept as ranks (not dropped; zero_method 'zsplit') or the test is one-sided."""
    assert wilcoxon_signed_rank([1.0, 2.0, 3.0, 4.0, 5.0])["p"] == pytest.approx(0.0625)
    assert wilcoxon_signed_rank([-0.5, 2.0, 3.0, 4.0, 5.0])["p"] == pytest.approx(0.125)
    assert wilcoxon_signed_rank([0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0])["p"] == pytest.approx(0.0625)
    assert wilcoxon_signed_rank(np.zeros(7)) == {"statistic": 0.0, "p": 1.0, "n_nonzero": 0}

    rng = np.random.default_rng(4)
    d = np.round(rng.normal(0.3, 1.0, 64), 1)  # rounding: ties (and a few zeros)
    nz = d[d != 0]
    n = nz.size
    assert n > 50 and len(np.unique(np.abs(nz))) < n  # the normal approximation, with ties
    ranks = scipy.stats.rankdata(np.abs(nz))
    t_plus = ranks[nz > 0].sum()
    _, ties = np.unique(np.abs(nz), return_counts=True)
    var = n * (n + 1) * (2 * n + 1) / 24 - np.sum(ties ** 3 - ties) / 48
    z = (t_plus - n * (n + 1) / 4) / math.sqrt(var)
    want = math.erfc(abs(z) / math.sqrt(2))  # = 2 (1 - Phi(|z|))
    got = wilcoxon_signed_rank(d)
    assert got["n_nonzero"] == n and got["p"] == pytest.approx(want, rel=1e-9)
    assert 0 < got["p"] < 0.05  # a shift of 0.3 sd over 60 pairs


def test_bad_values_are_refused():
    """Breaks if non-finite scores pass silently into the means."""
    with pytest.raises(ValueError, match="1 non-finite"):
        mean_ci([1.0, float("inf"), 2.0])
    with pytest.raises(ValueError, match="non-empty"):
        mean_ci([])
    with pytest.raises(ValueError, match="groups has shape"):
        mean_ci([1.0, 2.0], groups=[0])
