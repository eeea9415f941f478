"""Per-stage gold reward and win rate of the pipeline runs under a folder.

    python -m ibridge.analysis.stage_table multirun/measure-default

Prints one row per run (base → SFT → DPO) and the mean ± standard error over
runs, and says whether SFT beat the base model and DPO beat SFT in every run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ibridge.evaluation.stats import mean_and_stderr
from ibridge.sweep_layout import is_report_run

STAGES = ("base", "sft", "dpo")


def load_runs(folder: Path) -> list[tuple[Path, dict]]:
    runs = []
    for path in sorted(Path(folder).rglob("results.json")):
        if is_report_run(path.parent):  # `ibridge report`'s own run in <sweep>/report/
            continue
        runs.append((path.parent, json.loads(path.read_text())))
    return runs


def stage_table(folder: Path, console: Console | None = None) -> dict:
    console = console or Console(width=160)
    runs = load_runs(folder)
    if not runs:
        raise SystemExit(f"{folder}: no results.json found")
    table = Table(title=f"gold reward / win rate by stage — {folder}")
    table.add_column("run")
    table.add_column("status")
    for stage in STAGES:
        table.add_column(f"{stage} reward", justify="right")
        table.add_column(f"{stage} win", justify="right")
    rewards = {stage: [] for stage in STAGES}
    ordered = 0
    completed = 0
    for run_dir, results in runs:
        by_stage = results.get("eval_by_stage", {})
        row = [run_dir.name, results.get("status", "?")]
        for stage in STAGES:
            metrics = by_stage.get(stage)
            if metrics:
                rewards[stage].append(metrics["gold_reward"])
                row += [f"{metrics['gold_reward']:.3f}", f"{metrics['win_rate']:.3f}"]
            else:
                row += ["—", "—"]
        if results.get("status") == "completed" and all(s in by_stage for s in STAGES):
            completed += 1
            r = [by_stage[s]["gold_reward"] for s in STAGES]
            ordered += int(r[0] < r[1] < r[2])
        table.add_row(*row)
    summary_row = ["mean ± se", f"{completed}/{len(runs)}"]
    summary = {}
    for stage in STAGES:
        if rewards[stage]:
            mean, se = mean_and_stderr(np.array(rewards[stage]))
            summary[stage] = (mean, se)
            summary_row += [f"{mean:.3f} ± {se:.3f}" if np.isfinite(se) else f"{mean:.3f}", ""]
        else:
            summary_row += ["—", ""]
    table.add_row(*summary_row, style="bold")
    console.print(table)
    console.print(f"base < SFT < DPO in gold reward: {ordered} of {completed} completed runs")
    return {"runs": len(runs), "completed": completed, "ordered": ordered, "mean_se": summary}


if __name__ == "__main__":
    stage_table(Path(sys.argv[1] if len(sys.argv) > 1 else "multirun"))
