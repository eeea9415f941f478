"""A sweep prints a progress line as each cell ends (ibridge.summary.SweepSummary.on_job_end)."""

from __future__ import annotations

import json
import re


def test_a_progress_line_per_finished_cell(two_cell_sweep):
    out = (two_cell_sweep.parent / "stdout.txt").read_text()
    all_lines = out.splitlines()
    starts = [i for i, line in enumerate(all_lines) if line.startswith("ibridge: cell #")]
    assert len(starts) == 2, out[-2000:]
    for num, start in enumerate(starts):
        # in the order the cells ran, each with its status, time and its own post-DPO numbers, then
        # its overrides on the next line (80 columns: lines wrap between words, indented)
        end = next(i for i in range(start + 1, len(all_lines)) if all_lines[i].startswith("    debug=smoke"))
        line = " ".join([all_lines[start]] + [part.strip() for part in all_lines[start + 1:end]])  # wrapped at 80
        match = re.match(rf"ibridge: cell #{num} completed in ([\d.]+) s \(sweep [\d.]+ (s|min)\) \| "
                         r"dpo win rate ([\d.]+), gold ([\d.]+)$", line)
        assert match, line
        assert "objective=" in all_lines[end]
        assert all(len(line) <= 80 for line in all_lines[start:end + 1])
        folder = next(p for p in two_cell_sweep.iterdir() if p.name.startswith(f"{num}_"))
        results = json.loads((folder / "results.json").read_text())
        dpo = results["eval_by_stage"]["dpo"]
        assert float(match.group(3)) == round(dpo["win_rate"], 3)
        assert float(match.group(4)) == round(dpo["gold_reward"], 3)
        # the cell's time is results.json's, with one decimal under 10 s (as the tables show it)
        runtime = results["runtime_s"]
        assert match.group(1) == (f"{runtime:.1f}" if runtime < 10 else f"{runtime:.0f}")


def test_no_progress_line_for_a_single_run(smoke_run):
    # one pipeline prints its own table; the per-cell line is for sweeps only
    out = (smoke_run.parent / "stdout.txt").read_text()
    assert "pipeline — completed" in out and "ibridge: cell #" not in out
