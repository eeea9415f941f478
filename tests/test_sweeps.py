"""Hydra multirun through the real CLI: sweeps, failing cells, the report, launchers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_cli_smoke import ibridge

pytestmark = pytest.mark.slow  # whole runs under kills, sweeps, torchrun: `make test` runs them

SMOKE = ["debug=smoke", "logger=none"]  # a train sweep of SFT stages: dpo.* would be refused as unread


def cells(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}


# `two_cell_sweep`: the session's 2-cell sweep (objective=sft,jsd; tests/conftest.py).


def test_two_cell_sweep_and_report(two_cell_sweep, tmp_path, model_cache):
    runs = cells(two_cell_sweep)
    assert len(runs) == 2 and all(r["status"] == "completed" for r in runs.values())
    assert {r["stages"]["sft"]["objective"] for r in runs.values()} == {"sft", "jsd"}
    ibridge(["report", f"report.path={two_cell_sweep}", "logger=none", "hydra.run.dir=rep"], tmp_path, model_cache)
    table = (two_cell_sweep / "report.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "objective" not in line]
    assert {row.split("|")[1].strip().strip("*") for row in rows} == {"sft", "jsd"}
    assert (two_cell_sweep / "sft_vs_dpo_win_rate.png").stat().st_size > 1000
    for png in ("dpo_win_rate_vs_lr.png", "kl_vs_lr.png"):  # one lr: no plot against it
        assert not (two_cell_sweep / png).exists() and png not in table
    summary = json.loads((tmp_path / "rep" / "results.json").read_text())["report"]
    assert summary["cells"] == 2 and summary["failed"] == 0


def test_a_failing_cell_does_not_stop_the_sweep(tmp_path, model_cache):
    # The second cell starts from a checkpoint whose weights file is corrupt: it passes
    # validation (config.json and *.safetensors exist) and fails when the model loads.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    ibridge(["-m", "train", *SMOKE, f"checkpoint=null,{broken}", "hydra.sweep.dir=sw"], tmp_path, model_cache)
    runs = cells(tmp_path / "sw")
    statuses = sorted(r["status"] for r in runs.values())
    assert statuses == ["completed", "failed"]
    failed = next(r for r in runs.values() if r["status"] == "failed")
    assert failed["error"]
    ibridge(["report", f"report.path={tmp_path / 'sw'}", "logger=none", "hydra.run.dir=rep"], tmp_path, model_cache)
    report = (tmp_path / "sw" / "report.md").read_text()
    assert "## Failed runs" in report and failed["error"].split(":")[0] in report


def test_sweep_cells_share_one_wandb_group(tmp_path, model_cache):
    ibridge(["-m", "train", "debug=smoke", "lr=1e-3,5e-4", "hydra.sweep.dir=sw"], tmp_path, model_cache)
    logs = list((tmp_path / "sw").glob("*/wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 2
    groups = {r["wandb_group"] for r in cells(tmp_path / "sw").values()}
    assert len(groups) == 1
    group = next(iter(groups))
    assert group.startswith("sweep-")
    # The group is stored (protobuf string) in each offline run's log, as wandb will upload it.
    for log in logs:
        assert group.encode() in log.read_bytes()


def test_submitit_local_launcher_runs_two_cells(tmp_path, model_cache):
    ibridge(["-m", "train", "debug=smoke", "logger=none", "lr=1e-3,5e-4", "hydra/launcher=submitit_local",
             "hydra.launcher.timeout_min=10", "hydra.sweep.dir=sw"], tmp_path, model_cache)
    runs = cells(tmp_path / "sw")
    assert len(runs) == 2 and all(r["status"] == "completed" for r in runs.values())
    assert {r["stages"]["sft"]["lr"] for r in runs.values()} == {1e-3, 5e-4}
