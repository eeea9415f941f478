"""Paired differences against a baseline cell: does a cell beat plain SFT, or tv?

The paper's two questions are comparisons with plain SFT at the standard learning
rate: does a smaller SFT learning rate, or an f-divergence objective, raise the
post-DPO win rate? Comparing cell means answers them with more noise than needed,
because runs that share a seed share more than their seed. So the comparison is paired:

* the overrides that vary across the sweep (:func:`ibridge.analysis.runs.varying_keys`)
  are of two kinds. *Replicate* keys name a random draw (``model.pretrain.seed``: one
  toy base model per value); a *block* is the set of runs with the same values of them.
  Every other varying key (``objective.beta``, ``dpo.lr``, ...) is a *setting*, part of
  what is compared, like objective and lr;
* the baseline of a run is, in its block and with its own settings (keys under
  ``objective.`` aside, which plain sft ignores), either

  - ``sft``: plain sft at the largest sft learning rate there (the standard one in both
    grids); or
  - ``tv``, for the other f-divergences only: tv at the run's own lr and
    ``objective.granularity`` (and its ``objective.*`` settings where tv has them). tv is
    sft times beta (docs/objectives.md), so this is the like-for-like comparison: the
    same loss scale, hence the same gradient clipping, and the same granularity;

* each run is paired with the baseline run of the same block and seed, and the
  difference of the metric is averaged over the seeds of the block;
* blocks are the independent replicates: the effect is the mean over blocks with
  the standard error over blocks (over the paired seeds when there is one block).
  A base model is a random draw too, and seeds within one base are not independent
  of it, so pooling seeds across bases would understate the error;
* each effect has a Student-t interval and p-value over those replicates (n - 1 degrees of
  freedom), and the effects of one call (one baseline, one metric: one question) are
  Holm-corrected together; ``resolved`` follows :data:`ibridge.analysis.significance.RULE`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ibridge.analysis.runs import Run, lr_order, run_value, value_order, varying_keys
from ibridge.analysis.significance import holm, is_resolved, t_inference
from ibridge.evaluation.stats import mean_and_stderr

__all__ = ["BASELINES", "Effect", "is_replicate_key", "paired_effects", "with_inference"]

BASELINE_OBJECTIVE = "sft"
# Baseline name -> what the report says it is.
BASELINES = {
    "sft": "plain sft at the standard lr",
    "tv": "tv at the same lr and granularity, f-divergences only",
}
# The objectives compared with tv: the f-divergences other than tv (docs/design.md §1), not sft
# and not the objectives beside the paper (dft, sft_kl, ...). Named here rather than read from
# ibridge.objectives, which would load torch into `ibridge report`; tests/test_grids.py checks
# the set against the registry.
TV_COMPARED = frozenset({"chi2", "pearson", "hellinger", "jsd", "rkl"})


def is_replicate_key(key: str) -> bool:
    """A key that names a random draw (``seed``, ``model.pretrain.seed``, ``data.seed``)."""
    return key.rsplit(".", 1)[-1] == "seed"


def _objective_key(key: str) -> bool:
    return key.startswith("objective.")


@dataclass(frozen=True)
class Effect:
    objective: str
    lr: float | str | None
    metric: str
    per_block: dict[str, float]  # block label -> mean paired difference over its seeds
    units: tuple[float, ...]  # the replicates: per-block means, or the paired seeds of a single block
    mean: float
    se: float | None  # over `units`
    baseline_mean: float  # the baseline's metric, mean over blocks, for relative changes
    settings: tuple[str, ...] = ()  # the varying settings of the compared cell, "key=value"
    baseline: str = BASELINE_OBJECTIVE  # a key of BASELINES
    # Over `units` (ibridge/analysis/significance.py): None with fewer than 2 units.
    df: int | None = None
    ci_low: float | None = None  # 95% Student-t interval, uncorrected
    ci_high: float | None = None
    p: float | None = None  # two-sided one-sample t-test of a zero effect
    p_holm: float | None = None  # Holm-adjusted over the effects of one paired_effects call
    resolved: bool = False

    @property
    def relative(self) -> float | None:
        return self.mean / self.baseline_mean if self.baseline_mean else None

    @property
    def units_above(self) -> int:
        return sum(value > 0 for value in self.units)


def _choose(candidates: list[Run], run: Run, objective_keys: list[str]) -> list[Run]:
    """Among baseline candidates, those with the run's ``objective.*`` settings; else the
    candidates if they share one such setting; else none (ambiguous)."""
    def own(r: Run) -> tuple:
        return tuple(r.settings.get(key) for key in objective_keys)

    exact = [r for r in candidates if own(r) == own(run)]
    if exact:
        return exact
    return candidates if len({own(r) for r in candidates}) == 1 else []


def paired_effects(runs: list[Run], metric: str = "eval.dpo.win_rate", baseline: str = "sft") -> list[Effect]:
    """Every compared cell's paired difference in `metric` (``group.stage.name``) from `baseline`."""
    if baseline not in BASELINES:
        raise ValueError(f"baseline={baseline!r}: expected one of {sorted(BASELINES)}")
    values = {id(run): run_value(run, metric) for run in runs if run.completed}  # read each run once
    runs = [run for run in runs if values.get(id(run)) is not None]
    keys = varying_keys(runs)
    block_keys = [key for key in keys if is_replicate_key(key)]
    setting_keys = [key for key in keys if not is_replicate_key(key)]
    context_keys = [key for key in setting_keys if not _objective_key(key)]
    objective_keys = [key for key in setting_keys if _objective_key(key)]

    def block(run: Run) -> str:
        return ",".join(f"{key}={run.settings.get(key, '—')}" for key in block_keys)

    def context(run: Run) -> tuple:
        return block(run), tuple(run.settings.get(key) for key in context_keys)

    by_context: dict[tuple, list[Run]] = {}
    for run in runs:
        by_context.setdefault(context(run), []).append(run)

    def baseline_runs(run: Run) -> list[Run]:
        peers = by_context[context(run)]
        if baseline == "sft":
            candidates = [r for r in peers if r.objective == BASELINE_OBJECTIVE and isinstance(r.lr, float)]
            top = max((r.lr for r in candidates), default=None)
            candidates = [r for r in candidates if r.lr == top]
            return _choose(candidates, run, objective_keys)
        candidates = [r for r in peers if r.objective == "tv" and r.lr == run.lr and r.granularity == run.granularity]
        return _choose(candidates, run, [key for key in objective_keys if key != "objective.granularity"])

    diffs: dict[tuple, dict[str, list[float]]] = {}  # compared cell -> block -> paired differences
    base_means: dict[tuple, dict[str, float]] = {}  # compared cell -> block -> baseline mean over seeds
    for run in runs:
        if baseline == "tv" and run.objective not in TV_COMPARED:
            continue  # the tv baseline is for the other f-divergences
        matched = baseline_runs(run)
        if any(r is run for r in matched):
            continue  # the baseline itself
        base = {r.seed: values[id(r)] for r in matched}
        if run.seed not in base:
            continue  # no baseline run with this seed: failed, or not in the sweep
        cell = (run.objective, run.lr, tuple(f"{key}={run.settings.get(key, '—')}" for key in setting_keys))
        diffs.setdefault(cell, {}).setdefault(block(run), []).append(values[id(run)] - base[run.seed])
        base_means.setdefault(cell, {})[block(run)] = float(np.mean(list(base.values())))
    effects = []
    for (objective, lr, settings), by_block in diffs.items():
        per_block = {label: float(np.mean(d)) for label, d in sorted(by_block.items())}
        units = list(per_block.values()) if len(per_block) > 1 else next(iter(by_block.values()))
        _, se = mean_and_stderr(np.array(units, dtype=float))
        effects.append(Effect(objective, lr, metric, per_block, tuple(float(u) for u in units),
                              float(np.mean(list(per_block.values()))), se if math.isfinite(se) else None,
                              float(np.mean([base_means[(objective, lr, settings)][b] for b in per_block])),
                              settings, baseline))
    effects.sort(key=lambda e: (e.objective != BASELINE_OBJECTIVE, e.objective, lr_order(e.lr),
                               tuple(value_order(item.partition("=")[2]) for item in e.settings)))
    return with_inference(effects)


def with_inference(effects: list[Effect]) -> list[Effect]:
    """`effects` with their t-intervals and p-values, Holm-adjusted together (one question)."""
    tested = [t_inference(effect.units) for effect in effects]
    # A zero-spread sample has no p-value (NaN): it joins no family and shows as None.
    adjusted = holm([None if t is None or math.isnan(t.p) else t.p for t in tested])
    return [effect if t is None else dataclasses.replace(
                effect, df=t.df, ci_low=t.ci_low, ci_high=t.ci_high, p=None if math.isnan(t.p) else t.p,
                p_holm=p_holm, resolved=is_resolved(p_holm))
            for effect, t, p_holm in zip(effects, tested, adjusted, strict=True)]
