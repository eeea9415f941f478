"""A sweep before it starts: one line per bad cell and no folder, --dry-run, the time estimate,
and sweep.resume (ibridge/sweeps.py, ibridge/sweep_time.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from ibridge.cli import CONF_DIR
from ibridge.sweep_time import estimate, past_runtimes, shape
from ibridge.sweeps import SweepError, axes, check_cells, plan_cells, probe_cells, resume_sweep
from tests.test_cli_smoke import ibridge


def test_typos_in_a_sweep_list_are_one_line_each_and_leave_no_folder(tmp_path, model_cache):
    proc = ibridge(["-m", "objective=sft,jsdd", "lr=1e-3,-1", "hydra.sweep.dir=sw"], tmp_path, model_cache,
                   check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    assert "cell #1 (objective=sft lr=-1): lr=-1: expected a number > 0" in lines[0]
    assert "cell #2 (objective=jsdd lr=0.001)" in lines[1] and "valid options: " in lines[1]
    assert not (tmp_path / "sw").exists() and not (tmp_path / "multirun").exists()


def test_dry_run_lists_the_cells_and_their_time_and_runs_nothing(tmp_path, model_cache):
    proc = ibridge(["-m", "--dry-run", "debug=smoke", "objective=sft,jsd", "seed=0,1"], tmp_path, model_cache)
    out = proc.stdout
    assert out.startswith("ibridge: sweep of 4 cells (2 objective x 2 seed)")
    assert "every cell: debug=smoke" in out
    assert re.findall(r"#(\d)\s+objective=(\w+) seed=(\d)", out) == [
        ("0", "sft", "0"), ("1", "sft", "1"), ("2", "jsd", "0"), ("3", "jsd", "1")]
    assert "a cell from toy timings" in out  # no past runs here: the README's figures, and it says so
    assert not (tmp_path / "multirun").exists()
    # --cfg cannot print a sweep's config: the same preview instead of Hydra's error
    proc = ibridge(["-m", "--cfg", "job", "debug=smoke", "objective=sft,jsd"], tmp_path, model_cache)
    assert "ibridge: sweep of 2 cells" in proc.stdout and "#1  objective=jsd" in proc.stdout
    assert all(len(line) <= 80 for line in proc.stdout.splitlines())


def test_the_default_grid_is_counted_from_its_grid_file():
    cells, _ = plan_cells(CONF_DIR, ["-m", "grid=lr"])
    assert len(cells) == 4 * 3 * 3
    assert axes(cells) == {"lr": ["0.001", "0.0003", "0.0001", "3e-05"], "seed": ["0", "1", "2"],
                           "model.pretrain.seed": ["null", "1", "2"]}
    # every value of every axis is checked, not every cell: 1 + 3 + 2 + 2 composed configs
    assert len(probe_cells(cells)) == 8
    errors, configs = check_cells(CONF_DIR, cells)
    assert errors == [] and len(configs) == 8
    cells, _ = plan_cells(CONF_DIR, ["-m", "grid=lr", "seed=5"])  # a command-line axis replaces the grid's
    assert len(cells) == 12 and axes(cells)["lr"][0] == "0.001" and "seed" not in axes(cells)


def _past_run(root: Path, name: str, overrides: list[str], seconds: float, status: str = "completed") -> None:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"status": status, "job": "pipeline", "overrides": overrides,
                                                     "runtime_s": seconds}))


def test_the_estimate_comes_from_past_runs_of_the_same_shape(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "multirun" / "2025-01-01" / "10-00-00"
    _past_run(sweep, "0_a", ["debug=smoke", "seed=0", "lr=1e-3"], 20.0)
    _past_run(sweep, "1_b", ["debug=smoke", "seed=1", "lr=1e-4"], 30.0)
    _past_run(sweep, "2_c", ["debug=smoke", "seed=2"], 100.0)
    _past_run(sweep, "3_d", ["debug=smoke", "seed=3"], 1.0, status="failed")  # not a completed run
    _past_run(sweep, "4_e", ["debug=smoke", "sft.epochs=5"], 500.0)  # another shape: more epochs
    assert sorted(past_runtimes()[shape("pipeline", ["debug=smoke"])]) == [20.0, 30.0, 100.0]
    cells = [["debug=smoke", "seed=7", "lr=3e-4"], ["debug=smoke", "seed=8", "lr=3e-4"]]
    line = estimate(cells, {}, {})
    assert line.startswith("est. 60 s (30 s a cell from past runs like these")  # the median, twice
    assert estimate([["debug=smoke", "sft.epochs=9"]], {}, {}).startswith("no time estimate")


def test_resume_names_the_folder_and_reuses_its_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SweepError, match="needs -m"):
        resume_sweep(["sweep.resume=last"])
    with pytest.raises(SweepError, match="multirun/ does not exist"):
        resume_sweep(["-m", "sweep.resume=last"])
    older, newer = tmp_path / "multirun" / "2025-01-01" / "09-00-00", tmp_path / "multirun" / "2025-01-02" / "08-00-00"
    for folder, overrides in ((older, ["lr=1,2"]), (newer, ["objective=sft,jsd", "seed=0"])):
        folder.mkdir(parents=True)
        (folder / "multirun.yaml").write_text("hydra:\n  overrides:\n    task:\n" +
                                              "".join(f"    - {o}\n" for o in overrides))
        (folder / "0_x").mkdir()
        (folder / "0_x" / "results.json").write_text("{}")
    assert resume_sweep(["-m", "sweep.resume=last"]) == ["-m", "objective=sft,jsd", "seed=0",
                                                         f"hydra.sweep.dir={Path('multirun/2025-01-02/08-00-00')}"]
    # overrides given on the command line are the sweep's, as given
    assert resume_sweep(["-m", f"sweep.resume={older}", "lr=3"]) == ["-m", "lr=3", f"hydra.sweep.dir={older}"]
    with pytest.raises(SweepError, match="not a sweep folder"):
        resume_sweep(["-m", f"sweep.resume={tmp_path}"])


@pytest.mark.slow
def test_a_resumed_sweep_skips_its_completed_cells_and_finishes_the_rest(two_cell_sweep, tmp_path, model_cache):
    sweep = tmp_path / "sw"
    shutil.copytree(two_cell_sweep, sweep, symlinks=True)
    broken = next(sweep.glob("1_*"))  # cell #1 as if killed during its DPO stage
    (broken / "results.json").unlink()
    shutil.rmtree(broken / "dpo")
    shutil.rmtree(broken / "eval" / "dpo")
    before = (next(sweep.glob("0_*")) / "results.json").read_text()
    proc = ibridge(["-m", "sweep.resume=sw"], tmp_path, model_cache)  # the same overrides, from multirun.yaml
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ibridge: cell #")]
    assert lines[0].startswith("ibridge: cell #0 skipped (completed earlier)"), proc.stdout[-3000:]
    assert lines[1].startswith("ibridge: cell #1 completed in "), proc.stdout[-3000:]
    assert (next(sweep.glob("0_*")) / "results.json").read_text() == before  # untouched
    results = json.loads((broken / "results.json").read_text())
    assert results["status"] == "completed" and set(results["eval_by_stage"]) == {"base", "sft", "dpo"}
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()) == sorted(
        p.name for p in two_cell_sweep.iterdir() if p.is_dir() and p.name[0].isdigit())  # no new cell folders
