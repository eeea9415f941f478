"""Evaluation statistics for comparing a model against fixed reference outputs.

The setting is the one used by AlpacaEval: for every prompt a judge compares the
model's output with a fixed reference output, giving a per-prompt *preference*
for the model in ``[0, 1]`` (1 = model preferred, 0 = reference preferred,
0.5 = tie; soft judge probabilities are also allowed).  This module turns such
preferences (or raw judge / reward scores) into summary statistics:

* :func:`preferences_from_scores` - scores of both sides -> per-prompt preferences.
* :func:`win_rate` - mean preference (ties count half).
* :func:`length_controlled_win_rate` - simplified AlpacaEval-2 LC win rate.
* :func:`bootstrap_ci` - percentile bootstrap interval over prompts.
* :func:`auroc` - area under the ROC curve (Mann-Whitney U with average ranks).
* :func:`spearman` - Spearman rank correlation (average ranks for ties).
* :func:`mean_and_stderr` - mean and standard error of the mean.

Everything is pure numpy and deterministic (randomness only through an explicit
``seed``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

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
# (n_resamples * n int64 values are drawn in row chunks of at most this size).
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


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``; tied values all get the average of their ranks."""
    n = x.shape[0]
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new_group = np.empty(n, dtype=bool)
    new_group[:1] = True
    new_group[1:] = xs[1:] != xs[:-1]
    group_id = np.cumsum(new_group) - 1  # 0-based group index of each sorted element
    starts = np.flatnonzero(np.append(new_group, True))  # group boundaries, plus n at the end
    # Group k occupies sorted positions starts[k] .. starts[k+1]-1, i.e. ranks
    # starts[k]+1 .. starts[k+1]; their average is (starts[k] + 1 + starts[k+1]) / 2.
    avg = (starts[:-1] + 1 + starts[1:]) / 2.0
    ranks = np.empty(n, dtype=float)
    ranks[order] = avg[group_id]
    return ranks


def _sigmoid(z):
    # Numerically stable logistic function (no overflow warnings for large |z|).
    z = np.asarray(z, dtype=float)
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


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


def _resample_index_chunks(rng: np.random.Generator, n: int, n_resamples: int) -> Iterator[np.ndarray]:
    """Yield ``(rows, n)`` index arrays covering ``n_resamples`` bootstrap resamples.

    The chunking depends only on ``(n, n_resamples)``, so the vectorised and the
    generic code paths of :func:`bootstrap_ci` consume the random stream identically.
    """
    rows_per_chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    done = 0
    while done < n_resamples:
        rows = min(rows_per_chunk, n_resamples - done)
        yield rng.integers(0, n, size=(rows, n))
        done += rows


def bootstrap_ci(
    values,
    stat: Callable[[np.ndarray], float] = np.mean,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int | None = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``stat(values)`` over prompts.

    Draws ``n_resamples`` resamples of the ``n`` prompts with replacement (rows
    along axis 0), evaluates ``stat`` on each and returns the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles (numpy's
    default linear interpolation) of the bootstrap distribution.

    When ``stat is np.mean`` and ``values`` is 1-D the computation is vectorised
    (no Python loop over resamples; indices are drawn in memory-bounded chunks).
    Any other ``stat`` is called once per resample on an array of the same shape
    as ``values``; it must return a scalar.  Multi-column data can be bootstrapped
    jointly by passing an ``(n, k)`` array, e.g. ``np.column_stack([scores,
    labels])`` with ``stat=lambda v: auroc(v[:, 0], v[:, 1])`` (a resample with a
    single class then raises from :func:`auroc`).

    The result is a deterministic function of ``seed`` (``numpy.random.default_rng``);
    both code paths draw the same indices, so ``stat=np.mean`` and
    ``stat=lambda v: np.mean(v)`` give the same interval for the same seed.

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
    n_resamples = int(n_resamples)
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must lie strictly between 0 and 1")

    rng = np.random.default_rng(seed)
    chunks = _resample_index_chunks(rng, n, n_resamples)
    if stat is np.mean and v.ndim == 1:
        vf = v.astype(float, copy=False)
        stats = np.concatenate([vf[idx].mean(axis=1) for idx in chunks])
    else:
        stats = np.empty(n_resamples, dtype=float)
        k = 0
        for idx in chunks:
            for row in idx:
                stats[k] = float(stat(v[row]))
                k += 1

    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2.0, 1.0 - alpha / 2.0])
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
    """Length-controlled (LC) win rate, a simplified version of AlpacaEval 2's.

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
    leaderboard numbers.

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
    ranks = _average_ranks(s)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def spearman(x, y) -> float:
    """Spearman rank correlation, with average ranks for ties.

    The Pearson correlation of the average ranks of ``x`` and ``y`` (matches
    ``scipy.stats.spearmanr``).  Returns ``nan`` if either variable is constant
    (including ``n < 2``) or if any value is NaN.

    Raises:
        ValueError: if ``x`` and ``y`` are not 1-D of the same length.
    """
    xa = _as_1d_float(x, "x", allow_empty=True)
    ya = _as_1d_float(y, "y", allow_empty=True)
    _check_same_length(xa, ya, "x", "y")
    if xa.size < 2 or np.any(np.isnan(xa)) or np.any(np.isnan(ya)):
        return float("nan")
    rx = _average_ranks(xa)
    ry = _average_ranks(ya)
    rx -= rx.mean()
    ry -= ry.mean()
    sxx = float(rx @ rx)
    syy = float(ry @ ry)
    if sxx == 0.0 or syy == 0.0:
        return float("nan")
    rho = float(rx @ ry) / np.sqrt(sxx * syy)
    return float(np.clip(rho, -1.0, 1.0))


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
