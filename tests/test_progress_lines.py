"""A sweep prints a progress line as each cell ends (ibridge.summary.SweepSummary.on_job_end)."""

from __future__ import annotations

import json
import re


def test_a_progress_line_per_finished_cell(two_cell_sweep):
    out = (two_cell_sweep.parent / "stdout.txt").read_text()
    lines = [line for line in out.splitlines() if line.startswith("ibridge: cell #")]
    assert len(lines) == 2, out[-2000:]
    for num, line in enumerate(lines):
        # in the order the cells ran, each with its status, time, overrides and its own post-DPO numbers
        match = re.match(rf"ibridge: cell #{num} completed in [\d.]+ s \(sweep [\d.]+ (s|min)\): (\S+) \| "
                         r"dpo win rate ([\d.]+), gold ([\d.]+)$", line)
        assert match, line
        folder = next(p for p in two_cell_sweep.iterdir() if p.name.startswith(f"{num}_"))
        dpo = json.loads((folder / "results.json").read_text())["eval_by_stage"]["dpo"]
        assert float(match.group(3)) == round(dpo["win_rate"], 3)
        assert float(match.group(4)) == round(dpo["gold_reward"], 3)


def test_no_progress_line_for_a_single_run(smoke_run):
    # one pipeline prints its own table; the per-cell line is for sweeps only
    out = (smoke_run.parent / "stdout.txt").read_text()
    assert "pipeline — completed" in out and "ibridge: cell #" not in out
