"""A sweep's report: mean ± standard error over seeds per cell, paired effects, plots, failed runs.

    ibridge report                          # the newest sweep under multirun/
    ibridge report report.path=multirun/2025-01-01/12-00-00
    python -m ibridge.analysis.report [SWEEP_DIR [OUT_DIR]]

This module only puts the pieces together; each has its own module, imported one way:
:mod:`~ibridge.analysis.runs` (runs and cells of a sweep folder, the keys that vary) ←
:mod:`~ibridge.analysis.effects` (paired differences from a baseline) ←
:mod:`~ibridge.analysis.tables` (report.md, the console table) and
:mod:`~ibridge.analysis.sweep_plots` (the PNGs) ← this module.

Writes into the output folder (default: the sweep folder) ``report.md``,
``report.json`` and the PNGs of :data:`PLOTS`, and prints the table.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from ibridge.analysis import sweep_plots
from ibridge.analysis.effects import BASELINES, Effect, paired_effects
from ibridge.analysis.runs import Cell, Run, build_cells, load_runs, newest_sweep, varying_keys, varying_label
from ibridge.analysis.tables import COLUMNS, print_console, print_effects, report_markdown
from ibridge.io import write_json_atomic
from ibridge.terminal import width as terminal_width

__all__ = ["COLUMNS", "EFFECT_METRICS", "PLOTS", "Sweep", "load_runs", "newest_sweep", "summarise", "write_report"]

PLOTS = {
    "dpo_win_rate_vs_lr": "dpo_win_rate_vs_lr.png",
    "kl_vs_lr": "kl_vs_lr.png",
    "sft_vs_dpo_win_rate": "sft_vs_dpo_win_rate.png",
    "paired_effects": "paired_effects.png",
}
_PLOT_TITLES = {
    "dpo_win_rate_vs_lr": "Post-DPO win rate against the SFT learning rate",
    "kl_vs_lr": "KL drift against the SFT learning rate",
    "sft_vs_dpo_win_rate": "Post-SFT against post-DPO win rate",
    "paired_effects": "Post-DPO win rate against plain sft at the standard lr, paired by seed",
}

# Paired comparisons with each baseline (ibridge/analysis/effects.py) in report.md.
EFFECT_METRICS = {"eval.dpo.win_rate": "Post-DPO win rate", "eval.dpo.gold_reward": "Post-DPO gold reward"}


@dataclass
class Sweep:
    """Everything a report shows, computed once: for report.md here, or any other consumer."""

    path: Path
    runs: list[Run]
    cells: list[Cell]
    effects: dict[str, dict[str, list[Effect]]]  # baseline -> metric -> effects


def summarise(sweep_dir: Path) -> Sweep:
    """Load `sweep_dir`'s runs, group them into cells and pair them with each baseline."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: no such folder")
    runs = load_runs(sweep_dir)
    if not runs:
        raise FileNotFoundError(f"{sweep_dir}: no results.json (nor Hydra run folder) below it")
    effects = {baseline: {metric: paired_effects(runs, metric, baseline) for metric in EFFECT_METRICS}
               for baseline in BASELINES}
    return Sweep(sweep_dir, runs, build_cells(runs), effects)


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base)) or "."
    except ValueError:
        return str(path)


def _cell_json(cell: Cell, sweep_dir: Path, keys: list[str]) -> dict:
    return {
        "objective": cell.objective,
        "lr": cell.lr,
        "overrides": list(cell.extra),
        "varying_overrides": varying_label(cell, keys),
        "settings": {key: cell.settings.get(key) for key in keys},  # the varying overrides, by key
        "seeds": sorted({run.seed for run in cell.runs}),
        "runs": len(cell.runs),
        "completed": len(cell.completed),
        "failed": len(cell.failed),
        "status": cell.status,
        "error": cell.error,
        "run_status": [
            {"run": _rel(run.path, sweep_dir), "seed": run.seed, "status": run.status, "error": run.error}
            for run in cell.runs
        ],
        "metrics": cell.metrics,
    }


def _effect_json(effect: Effect) -> dict:
    return {"objective": effect.objective, "lr": effect.lr, "settings": list(effect.settings),
            "mean": effect.mean, "se": effect.se, "relative": effect.relative, "units": list(effect.units),
            "per_block": effect.per_block, "df": effect.df, "ci95": [effect.ci_low, effect.ci_high],
            "p": effect.p, "p_holm": effect.p_holm, "resolved": effect.resolved}


def _draw_plots(sweep: Sweep, out_dir: Path) -> dict[str, Path]:
    """The sweep's PNGs. A plot against the SFT learning rate is drawn only when the sweep varies
    it, and the paired effects only when there are some; an earlier report's copy of a plot
    not drawn now is removed, so the folder and report.md agree."""
    cells = sweep.cells
    lr_swept = len({cell.lr for cell in cells if isinstance(cell.lr, float)}) > 1
    effects = sweep.effects["sft"]["eval.dpo.win_rate"]
    draw = {
        "dpo_win_rate_vs_lr": sweep_plots.plot_dpo_win_rate_vs_lr if lr_swept else None,
        "kl_vs_lr": sweep_plots.plot_kl_vs_lr if lr_swept else None,
        "sft_vs_dpo_win_rate": sweep_plots.plot_sft_vs_dpo,
        "paired_effects": (lambda _, path: sweep_plots.plot_effects(effects, path)) if effects else None,
    }
    paths = {}
    for name, plot in draw.items():
        if plot is None:
            (out_dir / PLOTS[name]).unlink(missing_ok=True)
        else:
            paths[name] = plot(cells, out_dir / PLOTS[name])
    return paths


def write_report(sweep_dir: Path, out_dir: Path | None = None, console: Console | None = None) -> dict:
    """Write report.md, report.json and the PNGs for `sweep_dir`; print the table.

    Returns what report.json holds: per cell its objective, lr, varying settings, seeds,
    status, errors and ``metrics[group][stage][metric] = {mean, se, n}`` (group ``eval``:
    ``eval_by_stage``; group ``train``: the ``stages`` records); the paired effects against
    plain sft (``effects``) and, for f-divergences, against tv (``effects_vs_tv``); and the
    paths written under ``files``.
    """
    sweep = summarise(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep.path
    out_dir.mkdir(parents=True, exist_ok=True)
    cells, runs = sweep.cells, sweep.runs
    paths = _draw_plots(sweep, out_dir)
    report_md = out_dir / "report.md"
    report_json = out_dir / "report.json"
    keys = varying_keys(cells)
    payload = {
        "sweep": str(sweep.path),
        "cells": [_cell_json(cell, sweep.path, keys) for cell in cells],
        "n_cells": len(cells),
        "n_runs": len(runs),
        "n_failed_runs": sum(not run.completed for run in runs),
        "n_failed_cells": sum(cell.status == "failed" for cell in cells),
        "varying": keys,
        "columns": {col.key: col.header for col in COLUMNS},
        "effects": {metric: [_effect_json(e) for e in found] for metric, found in sweep.effects["sft"].items()},
        "effects_vs_tv": {metric: [_effect_json(e) for e in found] for metric, found in sweep.effects["tv"].items()},
        "files": {"report_md": str(report_md), "report_json": str(report_json),
                  **{name: str(path) for name, path in paths.items()}},
    }
    plots = {name: (_PLOT_TITLES[name], path) for name, path in paths.items()}
    report_md.write_text(report_markdown(sweep.path, cells, runs, plots, sweep.effects, EFFECT_METRICS),
                         encoding="utf-8")
    write_json_atomic(report_json, payload)

    console = console or Console(width=terminal_width(), highlight=False)
    print_console(console, sweep.path, cells, runs)
    print_effects(console, sweep.effects, EFFECT_METRICS)
    console.print(f"report: {escape(str(report_md))} (+ report.json, {len(paths)} plots)")
    return payload


if __name__ == "__main__":
    args = sys.argv[1:]
    write_report(Path(args[0]) if args else newest_sweep(), Path(args[1]) if len(args) > 1 else None)
