"""Paired differences against a sweep's baseline cell: does a cell beat plain SFT?

The paper's two questions are comparisons with plain SFT at the standard learning
rate: does a smaller SFT learning rate, or an f-divergence objective, raise the
post-DPO win rate? Comparing cell means answers them with more noise than needed,
because runs that share a seed share more than their seed. So the comparison is paired:

* a *block* is the set of runs that agree on every override other than objective,
  lr and seed (in `make reproduce`, one toy base model: ``model.pretrain.seed``);
* the *baseline* of a block is plain ``sft`` at the block's largest learning rate
  (the standard one in both grids);
* each run is paired with the baseline run of the same block and seed, and the
  difference of the metric is averaged over the seeds of the block;
* blocks are the independent replicates: the effect is the mean over blocks with
  the standard error over blocks (over the paired seeds when there is one block).
  A base model is a random draw too, and seeds within one base are not independent
  of it, so pooling seeds across bases would understate the error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ibridge.analysis.report import Run, _fmt_lr, _lr_order, _no_data, _run_scalars, _save, _varying_extras
from ibridge.evaluation.stats import mean_and_stderr

BASELINE_OBJECTIVE = "sft"


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

    @property
    def relative(self) -> float | None:
        return self.mean / self.baseline_mean if self.baseline_mean else None

    @property
    def units_above(self) -> int:
        return sum(value > 0 for value in self.units)


def _value(run: Run, metric: str) -> float | None:
    group, stage, name = metric.split(".")
    return _run_scalars(run.results).get(group, {}).get(stage, {}).get(name)


def paired_effects(runs: list[Run], metric: str = "eval.dpo.win_rate") -> list[Effect]:
    """Every non-baseline cell's paired difference in `metric` (``group.stage.name``) from the baseline."""
    values = {id(run): _value(run, metric) for run in runs if run.completed}  # read each run once
    runs = [run for run in runs if values.get(id(run)) is not None]
    labels = _varying_extras(runs)  # a run's block: the overrides beyond objective/lr/seed that vary
    blocks: dict[str, list[Run]] = {}
    for run in runs:
        blocks.setdefault(labels[id(run)], []).append(run)
    baselines: dict[str, tuple[float, dict[int, float]]] = {}  # block -> (baseline lr, value by seed)
    for label, members in blocks.items():
        sft_lrs = [run.lr for run in members if run.objective == BASELINE_OBJECTIVE and isinstance(run.lr, float)]
        if sft_lrs:
            top = max(sft_lrs)
            baselines[label] = (top, {run.seed: values[id(run)] for run in members
                                      if run.objective == BASELINE_OBJECTIVE and run.lr == top})
    cells: dict[tuple, dict[str, list[float]]] = {}
    for label, members in blocks.items():
        if label not in baselines:
            continue  # no plain-sft run to compare with
        top, base = baselines[label]
        for run in members:
            if (run.objective, run.lr) != (BASELINE_OBJECTIVE, top) and run.seed in base:
                cells.setdefault((run.objective, run.lr), {}).setdefault(label, []).append(
                    values[id(run)] - base[run.seed])
    effects = []
    for (objective, lr), by_block in cells.items():
        per_block = {label: float(np.mean(diffs)) for label, diffs in sorted(by_block.items())}
        units = list(per_block.values()) if len(per_block) > 1 else next(iter(by_block.values()))
        mean, se = mean_and_stderr(np.array(units, dtype=float))
        baseline_mean = float(np.mean([np.mean(list(baselines[label][1].values())) for label in per_block]))
        effects.append(Effect(objective, lr, metric, per_block, tuple(float(u) for u in units),
                              float(np.mean(list(per_block.values()))), se if math.isfinite(se) else None,
                              baseline_mean))
    effects.sort(key=lambda e: (e.objective != BASELINE_OBJECTIVE, e.objective, _lr_order(e.lr)))
    return effects


def effects_markdown(effects: list[Effect], title: str) -> list[str]:
    """A Markdown section: one row per cell, its paired effect and the effect in each block."""
    if not effects:
        return []
    labels = sorted({label for effect in effects for label in effect.per_block})
    per_block_columns = labels if len(labels) > 1 else []
    unit = "blocks" if per_block_columns else "seeds"
    lines = [
        f"### {title}",
        "",
        f"Paired by seed with plain sft at the largest lr of the same block; mean ± se over "
        f"{'blocks (' + ', '.join(per_block_columns) + ')' if per_block_columns else 'the paired seeds'}.",
        "",
        "| " + " | ".join(["objective", "SFT lr", "Δ vs baseline", "relative", f"{unit} above 0",
                          *per_block_columns]) + " |",
        "|---|---|---:|---:|---:|" + "---:|" * len(per_block_columns),
    ]
    for effect in effects:
        se = f" ± {effect.se:.3f}" if effect.se is not None else ""
        rel = f"{100 * effect.relative:+.1f}%" if effect.relative is not None else "—"
        row = [effect.objective, _fmt_lr(effect.lr), f"{effect.mean:+.3f}{se}", rel,
               f"{effect.units_above}/{len(effect.units)}"]
        row += [f"{effect.per_block[label]:+.3f}" if label in effect.per_block else "—" for label in per_block_columns]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def plot_effects(effects: list[Effect], path: Path) -> Path:
    """One column per compared cell: each block's paired difference (small markers) and the
    pooled mean ± se (large marker); above the zero line means better than the baseline."""
    fig = Figure(figsize=(max(5.0, 1.1 * len(effects) + 2.5), 4.4), layout="constrained")
    ax = fig.add_subplot()
    if not effects:
        _no_data(ax)
        return _save(fig, path)
    labels = sorted({label for effect in effects for label in effect.per_block})
    markers = "osD^vPX*"
    for x, effect in enumerate(effects):
        for i, label in enumerate(labels):
            if label in effect.per_block:
                ax.plot(x + 0.12 * (i - (len(labels) - 1) / 2), effect.per_block[label], markers[i % len(markers)],
                        color=f"C{i % 10}", alpha=0.7, ms=5, label=(label or "all runs") if x == 0 else None)
        ax.errorbar(x, effect.mean, yerr=effect.se or 0.0, fmt="_", color="black", ms=22, mew=2, capsize=5,
                    elinewidth=1.5, label="mean ± se" if x == 0 else None)
    ax.axhline(0.0, color="gray", lw=1, ls="--")
    ax.set_xticks(range(len(effects)), [f"{e.objective}\n{_fmt_lr(e.lr)}" for e in effects], fontsize=8)
    ax.set_xlim(-0.6, len(effects) - 0.4)
    metric = effects[0].metric.split(".")[-1].replace("_", " ")
    ax.set_ylabel(f"Δ post-DPO {metric} vs baseline")
    ax.set_title("Paired by seed against plain sft at the standard lr\n"
                 "(small markers: per block; black: mean ± se over blocks)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)
