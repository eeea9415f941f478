"""Evaluation statistics for comparing a model against fixed reference outputs.

The setting is the one used by AlpacaEval: for every prompt a judge compares the
model's output with a fixed reference output, giving a per-prompt *preference*
for the model in ``[0, 1]`` (1 = model preferred, 0 = reference preferred,
0.5 = tie; soft judge probabilities are also allowed).  This module turns such
preferences (or raw judge / reward scores) into summary statistics:

* :func:`preferences_from_scores` - scores of both sides -> per-prompt preferences.
* :func:`win_rate` - mean preference (ties count half).
* :func:`length_controlled_win_rate` - a one-model logistic length control
  (not AlpacaEval 2's GLM: no instruction-difficulty term, see its docstring).
* :func:`bootstrap_ci` - percentile bootstrap interval over prompts (``scipy.stats.bootstrap``).
* :func:`auroc` - area under the ROC curve (Mann-Whitney U with ``scipy.stats.rankdata``).
* :func:`spearman` - Spearman rank correlation (``scipy.stats.spearmanr``).
* :func:`mean_and_stderr` - mean and standard error of the mean.

Ranks, rank correlation and the bootstrap are scipy's (tested code, not ours); the
LC logistic fit, which no library provides in this form, is written here. Everything
is deterministic (randomness only through an explicit ``seed``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import special
from scipy import stats as scipy_stats

__all__ = [
    "auroc",
    "bootstrap_ci",
    "length_controlled_win_rate",
    "mean_and_stderr",
    "preferences_from_scores",
    "spearman",
    "win_rate",
]

# Limit on the number of indices materialised at once by the bootstrap
# (scipy draws n_resamples * n int64 indices in batches of at most this many values).
_BOOTSTRAP_CHUNK_ELEMENTS = 1 << 22

# Bound on the intercept of the LC logistic fit: when every preference is 1
# (or 0) the maximum-likelihood intercept is +inf (-inf); we stop at |a| = 20,
# i.e. an LC win rate within ~2e-9 of 1 (0).
_LC_MAX_INTERCEPT = 20.0


# --------------------------------------------------------------------------- helpers


def _as_1d_float(x, name: str, *, allow_empty: bool = False) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional, got shape {arr.shape}")
    if not allow_empty and arr.size == 0:
        raise ValueError(f"{name} must not be empty")
    return arr


def _check_same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same length, got {a.shape[0]} and {b.shape[0]}"
        )


def _check_preferences(prefs) -> np.ndarray:
    p = _as_1d_float(prefs, "prefs")
    if not np.all(np.isfinite(p)):
        raise ValueError("prefs must be finite")
    if np.any((p < 0.0) | (p > 1.0)):
        raise ValueError("prefs must lie in [0, 1]")
    return p


def _sigmoid(z):
    return special.expit(np.asarray(z, dtype=float))  # numerically stable, no overflow warnings


# --------------------------------------------------------------------------- preferences


def preferences_from_scores(model_scores, reference_scores, atol: float = 1e-9) -> np.ndarray:
    """Per-prompt preference for the model from paired judge/reward scores.

    For prompt ``i`` the preference is ``1.0`` if ``model_scores[i] >
    reference_scores[i]`` (win), ``0.0`` if it is smaller (loss) and ``0.5`` on a
    tie, i.e. exact equality or ``|model - reference| <= atol``.

    Args:
        model_scores: 1-D array-like of the model's scores, one per prompt.
        reference_scores: 1-D array-like of the reference outputs' scores, same length.
        atol: absolute tolerance under which a difference counts as a tie (>= 0).

    Returns:
        Float array of preferences in ``{0.0, 0.5, 1.0}``.

    Raises:
        ValueError: on shape mismatch, non-1-D input, NaN scores or negative ``atol``.
    """
    m = _as_1d_float(model_scores, "model_scores", allow_empty=True)
    r = _as_1d_float(reference_scores, "reference_scores", allow_empty=True)
    _check_same_length(m, r, "model_scores", "reference_scores")
    if atol < 0:
        raise ValueError("atol must be non-negative")
    if np.any(np.isnan(m)) or np.any(np.isnan(r)):
        raise ValueError("scores must not contain NaN")
    tie = m == r  # exact equality first: handles equal infinities (inf - inf is nan)
    with np.errstate(invalid="ignore"):
        diff = m - r
        tie |= np.abs(diff) <= atol
    prefs = np.where(m > r, 1.0, 0.0)
    prefs[tie] = 0.5
    return prefs


def win_rate(prefs) -> float:
    """Win rate of the model: the mean of the per-prompt preferences.

    With hard preferences in ``{0, 0.5, 1}`` this is ``(wins + ties / 2) / n``;
    soft preferences in ``[0, 1]`` (e.g. judge probabilities) are averaged as is.

    Raises:
        ValueError: if ``prefs`` is empty, not 1-D, non-finite or outside ``[0, 1]``.
    """
    return float(np.mean(_check_preferences(prefs)))


# --------------------------------------------------------------------------- bootstrap


def bootstrap_ci(
    values,
    stat: Callable[[np.ndarray], float] = np.mean,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int | None = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``stat(values)`` over prompts.

    ``scipy.stats.bootstrap(method="percentile")`` over the row indices: ``n_resamples``
    resamples of the ``n`` rows (axis 0) with replacement, ``stat`` on each, and the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles (linear
    interpolation) of the bootstrap distribution. Resampling indices rather than values
    lets multi-column data be bootstrapped jointly: pass an ``(n, k)`` array, e.g.
    ``np.column_stack([scores, labels])`` with ``stat=lambda v: auroc(v[:, 0], v[:, 1])``
    (a resample with a single class then raises from :func:`auroc`).

    When ``stat is np.mean`` and ``values`` is 1-D the statistic is vectorised over the
    resamples; any other ``stat`` is called once per resample on an array shaped like
    ``values`` and must return a scalar. Both paths draw the same indices (scipy draws
    them before calling the statistic, in batches bounded by
    ``_BOOTSTRAP_CHUNK_ELEMENTS``), so ``stat=np.mean`` and ``stat=lambda v: np.mean(v)``
    give the same interval for the same seed. One row: every resample is the data itself.

    Args:
        values: array-like with at least one row; resampled along axis 0.
        stat: statistic of a resample; defaults to the mean.
        n_resamples: number of bootstrap resamples (>= 1).
        confidence: two-sided coverage level in ``(0, 1)``.
        seed: seed for ``numpy.random.default_rng``.

    Returns:
        ``(low, high)`` as Python floats.

    Raises:
        ValueError: on empty or 0-d input, ``n_resamples < 1`` or ``confidence``
            outside ``(0, 1)``.
    """
    v = np.asarray(values)
    if v.ndim == 0:
        raise ValueError("values must be at least 1-dimensional")
    n = v.shape[0]
    if n == 0:
        raise ValueError("values must not be empty")
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError("n_resamples must be a positive integer")
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must lie strictly between 0 and 1")
    if n == 1:  # scipy needs two observations; one row resamples only to itself
        value = float(stat(v))
        return value, value

    if stat is np.mean and v.ndim == 1:
        vf = v.astype(float, copy=False)

        def statistic(idx, axis=-1):
            return vf[idx].mean(axis=axis)

        vectorized = True
    else:

        def statistic(idx):
            return float(stat(v[idx]))

        vectorized = False
    result = scipy_stats.bootstrap(
        (np.arange(n),), statistic, n_resamples=int(n_resamples), batch=max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n),
        vectorized=vectorized, confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    return float(low), float(high)


# --------------------------------------------------------------------------- LC win rate


def _fit_soft_logistic(
    x: np.ndarray, y: np.ndarray, l2: float, max_iter: int, tol: float
) -> tuple[float, float]:
    """Minimise mean soft cross-entropy of sigmoid(a + b x) vs y, plus l2/2 * b^2.

    Damped Newton (IRLS) with backtracking on the penalised objective; the
    objective is convex so this converges in a handful of steps.  The intercept is
    kept within ``+-_LC_MAX_INTERCEPT`` (see module constant).
    """
    n = x.shape[0]
    X = np.column_stack([np.ones(n), x])
    penalty = np.array([0.0, l2])

    def objective(theta: np.ndarray) -> float:
        z = X @ theta
        # -[y log s(z) + (1-y) log(1 - s(z))] = y softplus(-z) + (1-y) softplus(z)
        ce = y * np.logaddexp(0.0, -z) + (1.0 - y) * np.logaddexp(0.0, z)
        return float(ce.mean() + 0.5 * l2 * theta[1] ** 2)

    theta = np.zeros(2)
    f = objective(theta)
    for _ in range(max_iter):
        p = _sigmoid(X @ theta)
        grad = X.T @ (p - y) / n + penalty * theta
        w = p * (1.0 - p)
        hess = (X * w[:, None]).T @ X / n + np.diag(penalty)
        hess += 1e-12 * np.eye(2)  # keep it invertible once the fit saturates
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while True:
            cand = theta - t * step
            cand[0] = np.clip(cand[0], -_LC_MAX_INTERCEPT, _LC_MAX_INTERCEPT)
            f_cand = objective(cand)
            if f_cand <= f + 1e-15 or t < 1e-8:
                break
            t *= 0.5
        moved = np.max(np.abs(cand - theta))
        theta, f = cand, f_cand
        if moved < tol:
            break
    return float(theta[0]), float(theta[1])


def length_controlled_win_rate(
    prefs,
    model_lengths,
    reference_lengths,
    l2: float = 1e-3,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> float:
    """A one-model length-controlled (LC) win rate: a logistic fit of the preferences on
    the length difference, *without* AlpacaEval 2's instruction-difficulty term.

    Model.  With ``d_i = model_lengths[i] - reference_lengths[i]`` and
    ``s = std(d)`` (population std, ``ddof=0``), fit

        P(model preferred on prompt i) = sigmoid(a + b * tanh(d_i / s))

    by minimising the mean *soft-label* cross-entropy against the preferences
    ``y_i = prefs[i]`` (a tie, 0.5, contributes half a win and half a loss; soft
    judge probabilities are used as is) plus ``l2 / 2 * b**2``:

        L(a, b) = -mean_i[y_i log p_i + (1 - y_i) log(1 - p_i)] + l2/2 * b^2.

    The fit is damped Newton / IRLS.  The LC win rate is the predicted preference
    at zero length difference, ``sigmoid(a)`` (``tanh(0) = 0``): "how often would
    the judge prefer the model if its outputs were as long as the reference's".
    A judge that favours longer outputs inflates the raw win rate of a verbose
    model (``b > 0``, ``d > 0``); the LC win rate removes that part.

    Degenerate cases:

    * ``std(d) == 0`` (all lengths equal, or a constant length offset): the
      length feature is identically zero and dropped; the intercept-only fit has
      ``sigmoid(a) = mean(prefs)``, so the result equals :func:`win_rate` (to the
      Newton tolerance).
    * All preferences 1 (or 0): the maximum-likelihood intercept is infinite; it
      is capped at ``|a| = 20``, so the result is within ~2e-9 of 1 (0) but never
      exactly 1 (0).
    * Preferences perfectly separated by the length feature: the L2 term keeps
      ``b`` finite.

    Differences from AlpacaEval 2.  AlpacaEval 2 fits one GLM jointly over all
    leaderboard models against a fixed baseline,
    ``logit P = (theta_m - theta_b) + phi_{m,b} * tanh(d / std(d)) +
    (psi_m - psi_b) * gamma_x``, where ``gamma_x`` is a per-instruction
    *difficulty* term shared across models, and reports
    ``mean_x sigmoid(theta_m - theta_b + (psi_m - psi_b) * gamma_x)`` (length term
    zeroed, averaged over instructions).  Here there is a single model/reference
    pair, no instruction-difficulty term and no cross-model sharing, so the
    result is simply ``sigmoid(a)``; values are not directly comparable with
    leaderboard numbers. In the toy world the gold judge itself penalises a wrong
    length (extra words, or an answer cut short), so length is part of gold quality
    there and controlling for it also removes real quality differences.

    Args:
        prefs: per-prompt preferences in ``[0, 1]``.
        model_lengths: length (e.g. tokens or characters) of each model output.
        reference_lengths: length of each reference output.
        l2: L2 penalty on the length coefficient ``b`` (on the mean loss scale; >= 0).
        max_iter: maximum Newton iterations.
        tol: stop when no parameter moves by more than this.

    Returns:
        The LC win rate in ``(0, 1)``.

    Raises:
        ValueError: on empty / mismatched / non-finite inputs, preferences outside
            ``[0, 1]`` or negative ``l2``.
    """
    y = _check_preferences(prefs)
    ml = _as_1d_float(model_lengths, "model_lengths")
    rl = _as_1d_float(reference_lengths, "reference_lengths")
    _check_same_length(y, ml, "prefs", "model_lengths")
    _check_same_length(y, rl, "prefs", "reference_lengths")
    if not (np.all(np.isfinite(ml)) and np.all(np.isfinite(rl))):
        raise ValueError("lengths must be finite")
    if l2 < 0:
        raise ValueError("l2 must be non-negative")

    d = ml - rl
    s = float(np.std(d))
    x = np.tanh(d / s) if s > 0 else np.zeros_like(d)
    a, _b = _fit_soft_logistic(x, y, l2=l2, max_iter=max_iter, tol=tol)
    return float(_sigmoid(np.array([a]))[0])


# --------------------------------------------------------------------------- ranking stats


def auroc(scores, labels) -> float:
    """Area under the ROC curve, with positives ``labels == 1``.

    Computed as the normalised Mann-Whitney U statistic with average ranks for
    tied scores: ``AUROC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos * n_neg)``,
    where ``R_pos`` is the rank sum of the positives.  Equivalently, the
    probability that a random positive scores higher than a random negative,
    counting score ties as 1/2.

    Args:
        scores: 1-D array-like of real scores (higher = more positive).
        labels: 1-D array-like of 0/1 (or bool) labels, same length.

    Raises:
        ValueError: on mismatched lengths, NaN scores, labels other than 0/1, or
            if only one class is present.
    """
    s = _as_1d_float(scores, "scores")
    lab = _as_1d_float(labels, "labels")
    _check_same_length(s, lab, "scores", "labels")
    if np.any(np.isnan(s)):
        raise ValueError("scores must not contain NaN")
    if not np.all((lab == 0) | (lab == 1)):
        raise ValueError("labels must be 0 or 1")
    pos = lab == 1
    n_pos = int(pos.sum())
    n_neg = s.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("auroc needs both positive and negative labels")
    ranks = scipy_stats.rankdata(s)  # average ranks for ties
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def spearman(x, y) -> float:
    """Spearman rank correlation, with average ranks for ties (``scipy.stats.spearmanr``).

    The Pearson correlation of the average ranks of ``x`` and ``y``.  Returns ``nan``
    (without scipy's warning) if either variable is constant, ``n < 2`` or any value is NaN.

    Raises:
        ValueError: if ``x`` and ``y`` are not 1-D of the same length.
    """
    xa = _as_1d_float(x, "x", allow_empty=True)
    ya = _as_1d_float(y, "y", allow_empty=True)
    _check_same_length(xa, ya, "x", "y")
    if xa.size < 2 or np.any(np.isnan(xa)) or np.any(np.isnan(ya)):
        return float("nan")
    if np.all(xa == xa[0]) or np.all(ya == ya[0]):  # undefined; scipy would also warn
        return float("nan")
    return float(scipy_stats.spearmanr(xa, ya).statistic)


# --------------------------------------------------------------------------- summary


def mean_and_stderr(values) -> tuple[float, float]:
    """Mean and standard error of the mean.

    ``stderr = std(values, ddof=1) / sqrt(n)``; for ``n == 1`` the stderr is ``nan``.

    Raises:
        ValueError: if ``values`` is empty or not 1-D.
    """
    v = _as_1d_float(values, "values")
    n = v.shape[0]
    mean = float(v.mean())
    if n == 1:
        return mean, float("nan")
    return mean, float(v.std(ddof=1) / np.sqrt(n))
