"""`ibridge report` on synthetic sweeps: every cell, failed ones too, mean ± se, plots."""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf
from rich.console import Console

from ibridge.analysis.report import PLOTS, newest_sweep, write_report
from ibridge.config import ConfigError
from ibridge.jobs import report as report_job

OBJECTIVES = ("sft", "jsd")
LRS = (1e-3, 1e-4)
SEEDS = (0, 1)
OOM = "RuntimeError: CUDA out of memory | tried to allocate 2 GiB"
RED = "\x1b[31m"
CONFIG_ERROR = "config error: lr=-1.0: expected a number > 0"


def _metrics(objective: str, lr: float, seed: int, stage: str) -> dict:
    base = 0.30 + (0.10 if objective == "jsd" else 0.0) + (0.05 if lr == 1e-3 else 0.0)
    bump = 0.15 if stage == "dpo" else 0.0
    win = round(base + bump + 0.02 * seed, 6)
    return {
        "gold_reward": round(win + 0.2, 6), "win_rate": win, "win_rate_ci": [win - 0.05, win + 0.05],
        "lc_win_rate": round(win - 0.01, 6), "avg_length": 2.0, "num_prompts": 100,
        "kl_to_ref": round((3.0 if stage == "sft" else 1.0) * (1 + 1000 * lr) * (1.5 if objective == "sft" else 1) + seed, 6),
        "kl_to_ref_se": 0.5, "implicit_reward_acc": round(0.8 + 0.01 * seed, 6),
    }


def _write_run(folder: Path, results: dict, config: str | None) -> None:
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.yaml").write_text(config)
    (folder / "results.json").write_text(json.dumps(results))


def make_sweep(root: Path) -> Path:
    """2 objectives × 2 lrs × 2 seeds, a failed seed in one cell, a cell that failed config validation."""
    sweep = root / "2025-01-02" / "10-00-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    num = 0
    for objective in OBJECTIVES:
        for lr in LRS:
            for seed in SEEDS:
                overrides = [f"objective={objective}", f"lr={lr:g}", f"seed={seed}"]
                results = {
                    "status": "completed", "job": "pipeline", "overrides": overrides,
                    "stages": {
                        "sft": {"objective": objective, "lr": lr, "steps": 184, "runtime_s": 20.0,
                                "checkpoint": "x", "kl_token": round(0.1 + seed * 0.04, 6)},
                        "dpo": {"objective": "dpo", "lr": 5e-4, "steps": 50, "runtime_s": 10.0},
                    },
                    "eval_by_stage": {
                        "base": {"gold_reward": 0.1, "win_rate": 0.05},
                        "sft": _metrics(objective, lr, seed, "sft"),
                        "dpo": _metrics(objective, lr, seed, "dpo"),
                    },
                    "runtime_s": 60.0,
                }
                results["eval"] = results["eval_by_stage"]["dpo"]
                config = f"seed: {seed}\nlr: {lr}\nobjective:\n  name: {objective}\n"
                _write_run(sweep / f"{num}_{'+'.join(o.replace('=', '-', 1) for o in overrides)}", results, config)
                num += 1
    # Seed 2 of (sft, 1e-3) failed during DPO: SFT stage and its eval exist, no DPO.
    overrides = ["objective=sft", "lr=0.001", "seed=2"]
    _write_run(sweep / f"{num}_{'+'.join(o.replace('=', '-', 1) for o in overrides)}", {
        "status": "failed", "error": OOM, "job": "pipeline", "overrides": overrides,
        "stages": {"sft": {"objective": "sft", "lr": 1e-3, "steps": 184}},
        "eval_by_stage": {"sft": _metrics("sft", 1e-3, 2, "sft")},
    }, "seed: 2\nlr: 0.001\nobjective:\n  name: sft\n")
    num += 1
    # A cell that failed config validation: no config.yaml, no stages, no eval.
    overrides = ["objective=jsd", "lr=-1", "seed=0"]
    _write_run(sweep / f"{num}_{'+'.join(o.replace('=', '-', 1) for o in overrides)}", {
        "status": "failed", "error": CONFIG_ERROR, "job": "pipeline", "overrides": overrides,
    }, None)
    return sweep


def _run(sweep: Path, out_dir: Path | None = None, width: int = 400) -> tuple[dict, str, str]:
    """write_report; returns the payload, report.md and the console output (ANSI colours kept)."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=True, color_system="standard")
    payload = write_report(sweep, out_dir, console=console)
    out = out_dir or sweep
    return payload, (out / "report.md").read_text(), buffer.getvalue()


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _table_rows(markdown: str) -> list[list[str]]:
    """The rows of the report's main table (the first one; the paired-effect tables follow it)."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[start + 2:]:  # past the header and its separator
        if not line.startswith("| "):
            break
        rows.append(line)
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    sweep = make_sweep(tmp_path_factory.mktemp("multirun"))
    payload, markdown, console = _run(sweep)
    return sweep, payload, markdown, console


def test_every_cell_is_in_the_table(report):
    sweep, payload, markdown, console = report
    rows = _table_rows(markdown)
    cells = {(row[0].strip("*"), row[1]) for row in rows}
    expected = {(o, f"{lr:g}") for o in OBJECTIVES for lr in LRS} | {("jsd", "-1")}
    assert cells == expected and len(rows) == 5
    assert payload["n_cells"] == 5 and payload["n_runs"] == 10
    assert payload["n_failed_runs"] == 2 and payload["n_failed_cells"] == 1
    console_rows = [_plain(line).split("│") for line in console.splitlines() if line.count("│") > 10]
    assert {(r[1].strip(), r[2].strip()) for r in console_rows if r[1].strip()} == expected
    json_payload = json.loads((sweep / "report.json").read_text())
    assert json_payload["n_cells"] == 5
    assert {(c["objective"], c["lr"]) for c in json_payload["cells"]} == {
        (o, lr) for o in OBJECTIVES for lr in LRS} | {("jsd", -1.0)}


def test_failed_cell_shown_with_its_error(report):
    sweep, payload, markdown, console = report
    failed = next(row for row in _table_rows(markdown) if row[1] == "-1")
    assert failed[0] == "**jsd**"
    assert failed[2:4] == ["0", "0"]  # seeds, n completed
    assert failed[4] == f"failed: {CONFIG_ERROR}"
    assert all(value == "—" for value in failed[5:])
    assert CONFIG_ERROR in markdown.split("## Failed runs")[1]
    # Console: the failed cell's row in red, starting its status with the error; full errors below.
    plain = _plain(console)
    lines = [line for line in console.splitlines() if line.count("│") > 10]
    row = next(line for line in lines if _plain(line).split("│")[2].strip() == "-1")
    assert RED in row and "failed: config error:" in _plain(row)
    assert f"failed 9_objective-jsd+lr--1+seed-0: {CONFIG_ERROR}" in plain
    cell = next(c for c in payload["cells"] if c["lr"] == -1.0)
    assert cell["status"] == "failed" and cell["error"] == CONFIG_ERROR and cell["metrics"] == {}
    # The partly failed cell keeps its two completed seeds and says one failed, with the error.
    partial = next(row for row in _table_rows(markdown) if row[:2] == ["sft", "0.001"])
    assert partial[2] == "0,1,2" and partial[3] == "2"
    assert partial[4] == "1/3 failed: " + OOM.replace("|", "\\|")
    assert f"failed 8_objective-sft+lr-0.001+seed-2: {OOM}" in plain
    ok_row = next(line for line in lines if _plain(line).split("│")[2].strip() == "0.0001")
    assert RED not in ok_row


def test_mean_and_stderr_by_hand(report):
    sweep, payload, markdown, console = report
    # Cell (jsd, 1e-4): post-DPO win rate 0.30 + 0.10 + 0.15 + 0.02 * seed over seeds 0, 1.
    a, b = 0.55, 0.57
    mean = (a + b) / 2
    se = math.sqrt(((a - mean) ** 2 + (b - mean) ** 2) / (2 - 1)) / math.sqrt(2)
    cell = next(c for c in payload["cells"] if (c["objective"], c["lr"]) == ("jsd", 1e-4))
    stat = cell["metrics"]["eval"]["dpo"]["win_rate"]
    assert stat["n"] == 2
    assert stat["mean"] == pytest.approx(mean) and stat["se"] == pytest.approx(se)
    row = next(row for row in _table_rows(markdown) if row[:2] == ["jsd", "0.0001"])
    headers = [c.strip() for c in markdown.splitlines()[next(
        i for i, line in enumerate(markdown.splitlines()) if line.startswith("| "))].strip("|").split(" | ")]
    assert row[headers.index("DPO win")] == f"{mean:.3f} ± {se:.3f}" == "0.560 ± 0.010"
    assert row[headers.index("KL/token SFT")] == "0.120 ± 0.020"
    # Failed runs do not enter the numbers: (sft, 1e-3) SFT win over seeds 0, 1 only.
    partial = next(c for c in payload["cells"] if (c["objective"], c["lr"]) == ("sft", 1e-3))
    assert partial["metrics"]["eval"]["sft"]["win_rate"]["mean"] == pytest.approx(0.36)


def test_single_seed_shows_just_the_mean(tmp_path):
    sweep = tmp_path / "sweep"
    _write_run(sweep / "0_seed-0", {
        "status": "completed", "job": "pipeline", "overrides": ["seed=0"],
        "stages": {"sft": {"objective": "sft", "lr": 1e-3}},
        "eval_by_stage": {"sft": _metrics("sft", 1e-3, 0, "sft"), "dpo": _metrics("sft", 1e-3, 0, "dpo")},
    }, "seed: 0\nlr: 0.001\nobjective:\n  name: sft\n")
    payload, markdown, _ = _run(sweep, tmp_path / "out")
    row = _table_rows(markdown)[0]
    assert row[:6] == ["sft", "0.001", "0", "1", "ok", "0.350"]
    assert payload["cells"][0]["metrics"]["eval"]["sft"]["win_rate"]["se"] is None
    # one cell: nothing varies, so no plot against the lr and no paired effect; the scatter only
    assert (tmp_path / "out" / PLOTS["sft_vs_dpo_win_rate"]).stat().st_size > 0
    for name in ("dpo_win_rate_vs_lr", "kl_vs_lr", "paired_effects"):
        assert not (tmp_path / "out" / PLOTS[name]).exists() and PLOTS[name] not in markdown
        assert name not in payload["files"]
    assert not (sweep / "report.md").exists()


def test_plots_exist_and_are_linked(report):
    sweep, payload, markdown, console = report
    for name in PLOTS.values():
        path = sweep / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        assert f"]({name})" in markdown


def test_cell_identity_falls_back_to_config_then_overrides(tmp_path):
    sweep = tmp_path / "sweep"
    # Failed before any stage; objective and lr from config.yaml, seed from it too.
    _write_run(sweep / "0", {"status": "failed", "error": "boom", "overrides": []},
               "seed: 3\nlr: 0.0003\nobjective:\n  name: tv\n")
    # No config.yaml: overrides; objective defaults to sft.
    _write_run(sweep / "1", {"status": "failed", "error": "bad", "overrides": ["lr=1e-6", "seed=4"]}, None)
    # A run folder Hydra made that never wrote results.json.
    (sweep / "2" / ".hydra").mkdir(parents=True)
    (sweep / "2" / ".hydra" / "overrides.yaml").write_text("- objective=jsd\n- lr=0.01\n")
    payload, markdown, _ = _run(sweep)
    got = {(c["objective"], c["lr"], tuple(c["seeds"]), c["status"]) for c in payload["cells"]}
    assert got == {("tv", 3e-4, (3,), "failed"), ("sft", 1e-6, (4,), "failed"), ("jsd", 0.01, (0,), "failed")}
    assert "no results.json" in markdown


def test_other_varying_overrides_split_cells(tmp_path):
    sweep = tmp_path / "sweep"
    for i, beta in enumerate((0.1, 0.5)):
        _write_run(sweep / str(i), {
            "status": "completed", "overrides": ["objective=jsd", f"objective.beta={beta}", "logger=none"],
            "stages": {"sft": {"objective": "jsd", "lr": 1e-3}},
            "eval_by_stage": {"sft": _metrics("jsd", 1e-3, i, "sft"), "dpo": _metrics("jsd", 1e-3, i, "dpo")},
        }, None)
    payload, markdown, _ = _run(sweep)
    assert [c["varying_overrides"] for c in payload["cells"]] == ["objective.beta=0.1", "objective.beta=0.5"]
    assert [c["settings"] for c in payload["cells"]] == [{"objective.beta": "0.1"}, {"objective.beta": "0.5"}]
    assert "| SFT lr | objective.beta | seeds |" in markdown
    assert "logger" not in markdown.split("## Failed runs")[0]
    assert [row[2] for row in _table_rows(markdown)] == ["0.1", "0.5"]


# A grid over four keys at once: SFT objective × SFT lr × objective.beta × dpo.lr, two seeds.
GRID_OBJECTIVES = {"sft": 0.0, "tv": 0.02, "jsd": 0.05}  # additive effect on the post-DPO win rate
GRID_LRS = {1e-3: 0.0, 1e-4: 0.03}
GRID_BETAS = (0.1, 1.0)  # jsd gains 0.1 * beta; sft and tv ignore beta
GRID_DPO_LRS = {5e-4: 0.0, 1e-4: -0.02}


def _grid_win(objective, lr, beta, dpo_lr, seed) -> float:
    return (0.40 + GRID_OBJECTIVES[objective] + GRID_LRS[lr] + (0.1 * beta if objective == "jsd" else 0.0)
            + GRID_DPO_LRS[dpo_lr] + 0.01 * seed)


def make_grid_sweep(root: Path) -> Path:
    num = 0
    for objective in GRID_OBJECTIVES:
        for lr in GRID_LRS:
            for beta in GRID_BETAS:
                for dpo_lr in GRID_DPO_LRS:
                    for seed in (0, 1):
                        # The same value spelt two ways (0.0005, 5e-04) is one cell.
                        dpo_text = f"{dpo_lr:g}" if seed == 0 else f"{dpo_lr:.0e}"
                        overrides = [f"objective={objective}", f"lr={lr:g}", f"objective.beta={beta}",
                                     f"dpo.lr={dpo_text}", f"seed={seed}"]
                        win = _grid_win(objective, lr, beta, dpo_lr, seed)
                        _write_run(root / f"{num}", {
                            "status": "completed", "job": "pipeline", "overrides": overrides,
                            "stages": {"sft": {"objective": objective, "lr": lr}},
                            "eval_by_stage": {"dpo": {"win_rate": win, "gold_reward": win + 0.2}},
                        }, None)
                        num += 1
    return root


def test_any_grid_of_swept_keys_groups_by_what_varies(tmp_path):
    payload, markdown, console = _run(make_grid_sweep(tmp_path / "sweep"), tmp_path / "out")
    assert payload["varying"] == ["dpo.lr", "objective.beta"]
    assert payload["n_cells"] == 3 * 2 * 2 * 2 and payload["n_runs"] == 48
    cells = {(c["objective"], c["lr"], c["settings"]["objective.beta"], c["settings"]["dpo.lr"]): c
             for c in payload["cells"]}
    assert set(cells) == {(o, lr, f"{b:g}", f"{d:g}") for o in GRID_OBJECTIVES for lr in GRID_LRS
                          for b in GRID_BETAS for d in GRID_DPO_LRS}
    # Each cell holds its two seeds; mean ± se by hand for one of them.
    stat = cells[("jsd", 1e-4, "1", "0.0001")]["metrics"]["eval"]["dpo"]["win_rate"]
    a, b = (_grid_win("jsd", 1e-4, 1.0, 1e-4, seed) for seed in (0, 1))
    assert stat["n"] == 2 and stat["mean"] == pytest.approx((a + b) / 2) and stat["se"] == pytest.approx(abs(a - b) / 2)
    # One column per varying key, rows ordered numerically within each.
    header = next(line for line in markdown.splitlines() if line.startswith("| objective"))
    assert header.startswith("| objective | SFT lr | dpo.lr | objective.beta | seeds |")
    rows = _table_rows(markdown)
    assert [row[:4] for row in rows[:4]] == [["jsd", "0.0001", "0.0001", "0.1"], ["jsd", "0.0001", "0.0001", "1"],
                                             ["jsd", "0.0001", "0.0005", "0.1"], ["jsd", "0.0001", "0.0005", "1"]]
    # Paired effects per (objective, lr, beta, dpo.lr): the sft baseline is plain sft at the top lr with
    # the same dpo.lr and beta, so the effect is exactly the additive terms that differ.
    effects = {(e["objective"], e["lr"], tuple(e["settings"])): e for e in payload["effects"]["eval.dpo.win_rate"]}
    assert len(effects) == 24 - 4  # every cell but the four baselines
    for (objective, lr, settings), effect in effects.items():
        beta = float(settings[1].split("=")[1])
        expected = GRID_OBJECTIVES[objective] + GRID_LRS[lr] + (0.1 * beta if objective == "jsd" else 0.0)
        assert effect["mean"] == pytest.approx(expected, abs=1e-12), (objective, lr, settings)
        assert effect["per_block"].keys() == {""} and len(effect["units"]) == 2
    # Against tv at the same lr, beta and granularity: only jsd is compared, by O[jsd] - O[tv] + 0.1 * beta.
    vs_tv = payload["effects_vs_tv"]["eval.dpo.win_rate"]
    assert {e["objective"] for e in vs_tv} == {"jsd"} and len(vs_tv) == 8
    for effect in vs_tv:
        beta = float(effect["settings"][1].split("=")[1])
        assert effect["mean"] == pytest.approx(0.05 - 0.02 + 0.1 * beta, abs=1e-12)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| objective | SFT lr | dpo.lr | objective.beta | Δ vs baseline |" in text
    assert "Against the like-for-like baseline (tv at the same lr and granularity" in text


def test_newest_sweep(tmp_path):
    root = tmp_path / "multirun"
    with pytest.raises(FileNotFoundError, match="no results.json"):
        root.mkdir()
        newest_sweep(root)
    old = root / "2025-01-01" / "09-00-00"
    new = root / "2025-01-01" / "11-00-00"
    empty = root / "2025-01-02" / "08-00-00"  # newest folder, but no results yet
    for sweep in (old, new):
        _write_run(sweep / "0_seed-0", {"status": "completed"}, None)
    empty.mkdir(parents=True)
    os.utime(old / "0_seed-0" / "results.json", (1000, 1000))
    os.utime(old, (1000, 1000))
    os.utime(new / "0_seed-0" / "results.json", (2000, 2000))
    os.utime(new, (2000, 2000))
    assert newest_sweep(root) == new
    os.utime(old / "0_seed-0" / "results.json", (3000, 3000))
    assert newest_sweep(root) == old
    with pytest.raises(FileNotFoundError, match="does not exist"):
        newest_sweep(tmp_path / "nowhere")


def test_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ctx = SimpleNamespace(cfg=OmegaConf.create({"report": {"path": None}}), results={})
    with pytest.raises(ConfigError, match="report.path=null"):
        report_job.run(ctx)
    sweep = tmp_path / "multirun" / "2025-01-01" / "09-00-00"
    _write_run(sweep / "0_seed-0", {"status": "failed", "error": "boom", "overrides": ["seed=0"]}, None)
    monkeypatch.setattr("ibridge.analysis.report.Console", lambda **kwargs: Console(file=io.StringIO(), **kwargs))
    report_job.run(ctx)
    assert ctx.results["report"] == {
        "path": str(Path("multirun/2025-01-01/09-00-00/report.md")), "sweep": str(Path("multirun/2025-01-01/09-00-00")),
        "cells": 1, "runs": 1, "failed": 1, "failed_cells": 1,
    }
    assert (sweep / "report.md").exists()
    ctx = SimpleNamespace(cfg=OmegaConf.create({"report": {"path": str(tmp_path / "missing")}}), results={})
    with pytest.raises(ConfigError, match="no such folder"):
        report_job.run(ctx)
