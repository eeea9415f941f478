"""Each sweep's `ibridge report` runs in that sweep's folder, with a wandb run of its own
(ibridge/run_folders.py, ibridge/sweep_layout.py). The issue: a second sweep's report took over
the first sweep's report run, because both ran in outputs/report/default."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from ibridge.analysis.runs import load_runs, newest_sweep
from tests.conftest import ibridge
from tests.test_report import make_sweep


@pytest.mark.slow  # three `ibridge report` runs with wandb
def test_each_sweeps_report_runs_inside_it_with_its_own_wandb_run(tmp_path, model_cache):
    first = make_sweep(tmp_path / "multirun")  # multirun/2025-01-02/10-00-00
    ibridge(["report"], tmp_path, model_cache)  # the newest sweep: the first
    second = first.with_name("11-00-00")
    shutil.copytree(first, second, ignore=shutil.ignore_patterns("report", "report.*", "*.png", "dashboard"))
    for path in second.rglob("*"):  # newer than anything of the first sweep, its report included
        os.utime(path, (2e9, 2e9))
    os.utime(second, (2e9, 2e9))
    assert newest_sweep(tmp_path / "multirun") == second
    ibridge(["report"], tmp_path, model_cache)

    assert not (tmp_path / "outputs" / "report").exists()
    logs = {sweep: json.loads((sweep / "report" / "default" / "run_log.json").read_text()) for sweep in (first, second)}
    assert logs[first]["wandb_id"] and logs[second]["wandb_id"] and logs[first]["wandb_id"] != logs[second]["wandb_id"]
    for sweep in (first, second):
        results = json.loads((sweep / "report" / "default" / "results.json").read_text())
        assert results["status"] == "completed" and results["report"]["sweep"].endswith(sweep.name)
        assert list((sweep / "report" / "default" / "wandb").glob("offline-run-*"))
        # the report run is not a cell of the sweep it reports
        assert all(run.path.parent != sweep / "report" for run in load_runs(sweep))
        assert len(load_runs(sweep)) == 10 and json.loads((sweep / "report.json").read_text())["n_runs"] == 10

    # reporting the first sweep again continues its own run, not the second's
    ibridge(["report", f"report.path={first}"], tmp_path, model_cache)
    assert json.loads((first / "report" / "default" / "run_log.json").read_text())["wandb_id"] == logs[first]["wandb_id"]


def test_a_report_run_is_not_a_cell_even_while_it_runs(tmp_path):
    from ibridge.sweep_layout import is_report_run

    sweep = make_sweep(tmp_path / "multirun")
    running = sweep / "report" / "default"
    (running / ".hydra").mkdir(parents=True)
    (running / ".hydra" / "overrides.yaml").write_text("- job=report\n")
    assert is_report_run(running) and len(load_runs(sweep)) == 10
    (running / "results.json").write_text(json.dumps({"status": "completed", "job": "report"}))
    assert is_report_run(running) and len(load_runs(sweep)) == 10
    assert newest_sweep(tmp_path / "multirun") == sweep
    cell = next(p for p in sweep.iterdir() if p.name.startswith("0_"))
    assert not is_report_run(cell)
    # a cell that happens to sit in a folder named report (hydra.sweep.dir=.../report) stays a cell
    assert not is_report_run(_moved(cell, tmp_path / "report" / cell.name))


def _moved(folder, target):
    shutil.copytree(folder, target)
    return target
