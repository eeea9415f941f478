"""How sure a paired effect is: its interval, p-value, Holm correction and the "resolved" rule.

A paired effect (:mod:`ibridge.analysis.effects`) is a mean over independent replicates: the
per-base means of the paired differences (the bases are the random draws; seeds within a base
are not independent of it), or, with one base only, the paired seeds themselves (an answer
about that base alone). With ``n`` replicates the mean has ``n - 1`` degrees of freedom, so:

- the interval is Student's t-interval over the replicates (:func:`t_inference`, by
  ``scipy.stats.ttest_1samp``), not mean ± 1.96 se: with 3 bases the 95% quantile is 4.30;
- the p-value is the two-sided one-sample t-test of "no effect";
- the rows of one question (one table: one baseline and one metric) are many tests at once,
  so their p-values are Holm-adjusted (:func:`holm`, by ``statsmodels``), which keeps the chance
  of calling any true null effect resolved at 5% or less whatever the rows' correlation.

The rule (:data:`RULE`), stated once wherever effects are shown, is docs/design.md §3's
reading of a report: a row is *resolved* when its Holm-adjusted p-value is below
:data:`ALPHA`. For a t-test that is the same as its t-interval at Holm's level for that row
(``1 - ALPHA / k`` for the smallest of k p-values, relaxing step by step for the next) excluding
0. The 95% interval shown beside it is the uncorrected one, for the effect's size.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ALPHA", "LEVEL", "RULE", "Inference", "holm", "is_resolved", "t_inference"]

ALPHA = 0.05
LEVEL = 1 - ALPHA  # of the intervals shown
RULE = (
    "Reading rule: each effect is a mean over independent replicates (per-base means of the paired "
    "differences; the paired seeds when there is one base), with a 95% Student-t interval on n - 1 "
    "degrees of freedom and a two-sided t-test p-value. A row is **resolved** when its p-value, "
    "Holm-adjusted across the rows of its table, is below 0.05 (equivalently: its t-interval at "
    "Holm's level excludes 0). Every other row is unresolved, whatever its mean or its signs."
)


@dataclass(frozen=True)
class Inference:
    """A one-sample t analysis of replicate values: the mean, its 95% interval and p-value."""

    n: int
    df: int
    mean: float
    ci_low: float
    ci_high: float
    p: float


def t_inference(units: Sequence[float], level: float = LEVEL) -> Inference | None:
    """Student's t-interval and two-sided p-value for the mean of `units`; None below 2 units.

    Units with no spread (all equal) have no estimable error: the interval is the point and
    the p-value is NaN, which :func:`is_resolved` never counts as resolved.
    """
    from scipy import stats

    values = np.asarray([float(u) for u in units], dtype=float)
    if values.size < 2 or not np.all(np.isfinite(values)):
        return None
    mean = float(values.mean())
    if np.ptp(values) == 0.0:
        return Inference(int(values.size), int(values.size) - 1, mean, mean, mean, math.nan)
    with warnings.catch_warnings():  # a near-constant sample warns about precision; the numbers stand
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_1samp(values, 0.0)
        interval = result.confidence_interval(confidence_level=level)
    return Inference(int(values.size), int(result.df), mean, float(interval.low), float(interval.high),
                     float(result.pvalue))


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-adjusted p-values of one family; None (no test: fewer than 2 units) and NaN stay out
    of the family and come back as they were."""
    from statsmodels.stats.multitest import multipletests

    tested = [i for i, p in enumerate(pvalues) if p is not None and math.isfinite(p)]
    adjusted: list[float | None] = list(pvalues)
    if tested:
        _, corrected, _, _ = multipletests([float(pvalues[i]) for i in tested], alpha=ALPHA, method="holm")
        for i, value in zip(tested, corrected, strict=True):
            adjusted[i] = float(value)
    return adjusted


def is_resolved(p_holm: float | None) -> bool:
    """The rule of :data:`RULE`: a Holm-adjusted p-value below :data:`ALPHA`."""
    return p_holm is not None and math.isfinite(p_holm) and p_holm < ALPHA
