"""Tests for ibridge.evaluation.stats against hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ibridge.evaluation.stats import (
    auroc,
    bootstrap_ci,
    length_controlled_win_rate,
    mean_and_stderr,
    preferences_from_scores,
    spearman,
    win_rate,
)

# --------------------------------------------------------------------------- preferences / win rate


def test_preferences_win_loss_tie_by_hand():
    model = [1.0, 2.0, 3.0, 4.0 + 1e-12, 5.0]
    ref = [0.0, 2.0, 5.0, 4.0, 5.0 + 1e-3]
    prefs = preferences_from_scores(model, ref)
    np.testing.assert_array_equal(prefs, [1.0, 0.5, 0.0, 0.5, 0.0])
    # wins 1, ties 2, losses 2 -> (1 + 2 * 0.5) / 5
    assert win_rate(prefs) == pytest.approx(2.0 / 5.0)


def test_preferences_atol_and_infinities():
    prefs = preferences_from_scores([1.0, np.inf, -np.inf, 1.0], [1.05, np.inf, 0.0, -np.inf], atol=0.1)
    np.testing.assert_array_equal(prefs, [0.5, 0.5, 0.0, 1.0])


def test_preferences_errors():
    with pytest.raises(ValueError):
        preferences_from_scores([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        preferences_from_scores([np.nan], [1.0])
    with pytest.raises(ValueError):
        preferences_from_scores([1.0], [1.0], atol=-1.0)


def test_win_rate_ties_count_half_and_soft_prefs():
    assert win_rate([1, 0, 0.5, 0.5]) == pytest.approx(0.5)
    assert win_rate([1, 1, 1, 0.5]) == pytest.approx(0.875)
    assert win_rate([0.2, 0.9]) == pytest.approx(0.55)
    assert isinstance(win_rate([1, 0]), float)


@pytest.mark.parametrize("bad", [[], [1.5], [-0.1], [np.nan]])
def test_win_rate_errors(bad):
    with pytest.raises(ValueError):
        win_rate(bad)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_deterministic_with_seed():
    vals = np.random.default_rng(1).random(50)
    a = bootstrap_ci(vals, seed=123)
    b = bootstrap_ci(vals, seed=123)
    c = bootstrap_ci(vals, seed=124)
    assert a == b
    assert a != c
    lo, hi = a
    assert lo <= vals.mean() <= hi
    assert isinstance(lo, float) and isinstance(hi, float)


def test_bootstrap_generic_stat_matches_vectorised_mean():
    vals = np.random.default_rng(2).normal(size=40)
    fast = bootstrap_ci(vals, n_resamples=300, seed=7)
    slow = bootstrap_ci(vals, stat=lambda v: float(np.mean(v)), n_resamples=300, seed=7)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)


def test_bootstrap_chunked_paths_agree(monkeypatch):
    # Force several index chunks: both code paths must still consume the same draws.
    import ibridge.evaluation.stats as stats_mod

    monkeypatch.setattr(stats_mod, "_BOOTSTRAP_CHUNK_ELEMENTS", 64)
    vals = np.random.default_rng(4).normal(size=30)
    fast = bootstrap_ci(vals, n_resamples=101, seed=9)
    slow = bootstrap_ci(vals, stat=lambda v: float(np.mean(v)), n_resamples=101, seed=9)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    assert fast[0] < vals.mean() < fast[1]


def _percentile_bootstrap_by_hand(values, n_resamples, confidence, seed, rows_per_draw):
    """The percentile bootstrap written out: indices drawn from default_rng(seed) in blocks of
    `rows_per_draw` resamples (as scipy's `batch` does), means, numpy's linear quantiles."""
    rng = np.random.default_rng(seed)
    n = len(values)
    means = []
    while len(means) < n_resamples:
        rows = min(rows_per_draw, n_resamples - len(means))
        means.extend(np.asarray(values)[rng.integers(0, n, size=(rows, n))].mean(axis=1))
    alpha = 1 - confidence
    return tuple(np.quantile(means, [alpha / 2, 1 - alpha / 2]))


@pytest.mark.parametrize(("n", "n_resamples", "confidence"), [(7, 500, 0.95), (40, 1001, 0.9), (300, 200, 0.5)])
def test_bootstrap_matches_a_hand_written_percentile_bootstrap(n, n_resamples, confidence, monkeypatch):
    import ibridge.evaluation.stats as stats_mod

    monkeypatch.setattr(stats_mod, "_BOOTSTRAP_CHUNK_ELEMENTS", 2048)  # several batches of draws
    vals = np.random.default_rng(n).normal(size=n)
    expected = _percentile_bootstrap_by_hand(vals, n_resamples, confidence, seed=5, rows_per_draw=2048 // n)
    got = bootstrap_ci(vals, n_resamples=n_resamples, confidence=confidence, seed=5)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_bootstrap_one_row_is_its_own_interval():
    assert bootstrap_ci([0.25]) == (0.25, 0.25)
    assert bootstrap_ci(np.array([[1.0, 3.0]]), stat=lambda v: float(v[:, 1].sum())) == (3.0, 3.0)


def test_bootstrap_generic_stat_and_constant_values():
    assert bootstrap_ci([3.0] * 10) == (3.0, 3.0)
    vals = np.arange(21.0)
    lo, hi = bootstrap_ci(vals, stat=np.median, n_resamples=200, seed=0)
    assert lo <= 10.0 <= hi
    # Joint resampling of rows of a 2-D array.
    pairs = np.column_stack([np.arange(10.0), np.arange(10.0) * 2])
    lo, hi = bootstrap_ci(pairs, stat=lambda v: float(np.mean(v[:, 1] - 2 * v[:, 0])), n_resamples=50)
    assert lo == hi == 0.0


def test_bootstrap_narrower_at_lower_confidence():
    vals = np.random.default_rng(3).random(100)
    lo95, hi95 = bootstrap_ci(vals, confidence=0.95)
    lo50, hi50 = bootstrap_ci(vals, confidence=0.5)
    assert lo95 <= lo50 <= hi50 <= hi95


@pytest.mark.parametrize(
    "kwargs",
    [{"values": []}, {"values": [1.0], "n_resamples": 0}, {"values": [1.0], "confidence": 1.0}],
)
def test_bootstrap_errors(kwargs):
    with pytest.raises(ValueError):
        bootstrap_ci(**kwargs)


def test_bootstrap_coverage_bernoulli():
    rng = np.random.default_rng(20240601)
    p, n, n_datasets = 0.6, 200, 200
    covered = 0
    for i in range(n_datasets):
        prefs = (rng.random(n) < p).astype(float)
        lo, hi = bootstrap_ci(prefs, n_resamples=1000, confidence=0.95, seed=i)
        covered += lo <= p <= hi
    assert 0.90 * n_datasets <= covered <= 0.99 * n_datasets


# --------------------------------------------------------------------------- LC win rate


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_lc_equal_lengths_equals_win_rate():
    prefs = np.array([1, 0, 0.5, 1, 1, 0, 0.5, 1, 0, 1], dtype=float)
    lengths = np.full(prefs.shape, 100.0)
    lc = length_controlled_win_rate(prefs, lengths, lengths)
    assert lc == pytest.approx(win_rate(prefs), abs=1e-3)
    # A constant length offset also has std 0: the length term drops.
    lc_offset = length_controlled_win_rate(prefs, lengths + 37, lengths)
    assert lc_offset == pytest.approx(win_rate(prefs), abs=1e-3)


def test_lc_all_wins_is_clipped_below_one():
    prefs = np.ones(20)
    lengths = np.random.default_rng(0).integers(50, 150, size=20).astype(float)
    lc = length_controlled_win_rate(prefs, lengths, lengths[::-1])
    assert 0.999 < lc < 1.0
    lc0 = length_controlled_win_rate(np.zeros(20), lengths, lengths[::-1])
    assert 0.0 < lc0 < 0.001


def _length_biased_case(model_longer: bool, n: int = 3000, seed: int = 0):
    """Judge with no real quality gap (a = 0) that likes longer outputs (b = 2)."""
    rng = np.random.default_rng(seed)
    ref_len = rng.normal(300.0, 50.0, size=n)
    delta = rng.normal(100.0 if model_longer else -100.0, 100.0, size=n)
    model_len = ref_len + delta
    x = np.tanh(delta / delta.std())
    p = _sigmoid(0.0 + 2.0 * x)
    u = rng.random(n)
    prefs = np.where(u < p, 1.0, 0.0)
    prefs[np.abs(u - p) < 0.05] = 0.5  # sprinkle ties
    return prefs, model_len, ref_len


def test_lc_lower_than_raw_when_judge_likes_length_and_model_is_longer():
    prefs, ml, rl = _length_biased_case(model_longer=True)
    raw = win_rate(prefs)
    lc = length_controlled_win_rate(prefs, ml, rl)
    assert raw > 0.6
    assert lc < raw - 0.1
    assert lc == pytest.approx(0.5, abs=0.06)  # recovers the true intercept


def test_lc_higher_than_raw_when_model_is_shorter():
    prefs, ml, rl = _length_biased_case(model_longer=False)
    raw = win_rate(prefs)
    lc = length_controlled_win_rate(prefs, ml, rl)
    assert raw < 0.4
    assert lc > raw + 0.1
    assert lc == pytest.approx(0.5, abs=0.06)


def test_lc_no_length_effect_keeps_win_rate():
    rng = np.random.default_rng(5)
    n = 2000
    ml = rng.normal(300, 60, size=n)
    rl = rng.normal(300, 60, size=n)
    prefs = (rng.random(n) < 0.7).astype(float)
    lc = length_controlled_win_rate(prefs, ml, rl)
    assert lc == pytest.approx(win_rate(prefs), abs=0.03)


def test_lc_errors():
    with pytest.raises(ValueError):
        length_controlled_win_rate([1.0, 0.0], [1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        length_controlled_win_rate([2.0], [1.0], [1.0])
    with pytest.raises(ValueError):
        length_controlled_win_rate([], [], [])


# --------------------------------------------------------------------------- AUROC


def _auroc_bruteforce(scores, labels):
    scores = np.asarray(scores, float)
    labels = np.asarray(labels)
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    total = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return total / (len(pos) * len(neg))


def test_auroc_hand_case():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([0.1, 0.2, 0.3], [0, 1, 1]) == pytest.approx(1.0)
    assert auroc([0.3, 0.2, 0.1], [0, 1, 1]) == pytest.approx(0.0)


def test_auroc_with_ties():
    # positives {0.5, 0.9} vs negatives {0.5, 0.2}: 0.5 tie (1/2) + three wins -> 3.5 / 4
    assert auroc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == pytest.approx(0.875)
    assert auroc([1.0, 1.0, 1.0, 1.0], [1, 0, 1, 0]) == pytest.approx(0.5)
    assert auroc([1, 2, 2, 3], [True, False, True, False]) == pytest.approx(0.125)


def test_auroc_matches_bruteforce_with_many_ties():
    rng = np.random.default_rng(11)
    scores = rng.integers(0, 5, size=60)
    labels = rng.integers(0, 2, size=60)
    assert auroc(scores, labels) == pytest.approx(_auroc_bruteforce(scores, labels), abs=1e-12)


@pytest.mark.parametrize(
    ("scores", "labels"),
    [
        ([0.1, 0.2], [1, 1]),
        ([0.1, 0.2], [0, 0]),
        ([0.1, 0.2], [0, 2]),
        ([np.nan, 0.2], [0, 1]),
        ([0.1], [0, 1]),
    ],
)
def test_auroc_errors(scores, labels):
    with pytest.raises(ValueError):
        auroc(scores, labels)


# --------------------------------------------------------------------------- Spearman


def test_spearman_by_hand_with_ties():
    # ranks x = [1, 2.5, 2.5, 4], ranks y = [1, 3, 2, 4] -> 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9), abs=1e-12)


def test_spearman_perfect_and_constant():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))
    assert math.isnan(spearman([1], [2]))
    assert math.isnan(spearman([1.0, np.nan, 3.0], [1.0, 2.0, 3.0]))
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


def _average_ranks_by_hand(x):
    # rank of v = 1 + (number of values below it) + (number of other values equal to it) / 2
    x = np.asarray(x)
    return np.array([1 + (x < v).sum() + ((x == v).sum() - 1) / 2 for v in x])


def test_spearman_is_pearson_of_hand_computed_average_ranks():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 6, size=80).astype(float)
    y = x + rng.integers(-3, 4, size=80)
    expected = np.corrcoef(_average_ranks_by_hand(x), _average_ranks_by_hand(y))[0, 1]
    assert spearman(x, y) == pytest.approx(float(expected), abs=1e-12)


# --------------------------------------------------------------------------- mean / stderr


def test_mean_and_stderr_by_hand():
    mean, se = mean_and_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5)
    assert se == pytest.approx(math.sqrt(5.0 / 3.0) / 2.0)


def test_mean_and_stderr_single_and_empty():
    mean, se = mean_and_stderr([7.0])
    assert mean == 7.0 and math.isnan(se)
    with pytest.raises(ValueError):
        mean_and_stderr([])
