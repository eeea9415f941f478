"""wandb organised for dashboards (docs/design.md §3), checked on wandb's own offline files.

The runs are read back with tests/wandb_offline.py from the `.wandb` logs that
`wandb sync` would upload: job types, names, configs, summaries, histories, tables
and exit codes, against results.json and metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from ibridge.cell import EVAL_KEYS, cell_summary, stage_history
from ibridge.naming import cell_tag, fmt_lr
from ibridge.tracking import RunLogger, read_metrics
from tests.conftest import REPO, compose_config, ibridge
from tests.wandb_offline import read_records, read_runs

PIPELINE_RUNS = Counter({"eval": 3, "sft": 1, "dpo": 1, "cell": 1})
TABLE_COLUMNS = ["prompt", "output", "reference", "reward", "reference_reward", "preference", "first_error"]


def runs_of(run_dir: Path) -> list:
    return read_runs(run_dir, "wandb/offline-run-*")


def check_pipeline_runs(run_dir: Path) -> list:
    """The wandb runs of one pipeline folder against its results.json and metrics.jsonl."""
    results = json.loads((run_dir / "results.json").read_text())
    runs = runs_of(run_dir)
    assert Counter(r.job_type for r in runs) == PIPELINE_RUNS, [(r.name, r.job_type) for r in runs]
    assert len({r.name for r in runs}) == len(runs) and len({r.id for r in runs}) == len(runs)
    for r in runs:
        assert r.exit_code == 0 and r.summary["status"] == "completed", r.name
        assert r.group == results["wandb_group"]
        assert r.config["ibridge"]["cell"] == results["cell"] and r.config["ibridge"]["group"] == r.group
        assert r.config["run_dir"] == str(run_dir.resolve())

    (cell,) = [r for r in runs if r.job_type == "cell"]
    assert cell.name == f"cell-{results['cell']}"
    summary, evals, stages = cell.summary, results["eval_by_stage"], results["stages"]
    assert summary["eval/dpo/win_rate"] == results["eval"]["win_rate"] == evals["dpo"]["win_rate"]
    for stage, metrics in evals.items():
        assert [summary[f"eval/{stage}/win_rate_ci_low"], summary[f"eval/{stage}/win_rate_ci_high"]] == \
            metrics["win_rate_ci"]
        for key in set(EVAL_KEYS) & set(metrics):
            assert summary[f"eval/{stage}/{key}"] == metrics[key], (stage, key)
    assert "eval/base/kl_to_ref" not in summary  # the base model has no reference
    for stage in ("sft", "dpo"):
        for key in ("steps", "runtime_s", "tokens"):
            assert summary[f"train/{stage}/{key}"] == stages[stage][key]
    assert summary["train/sft/kl_token"] == stages["sft"]["kl_token"]
    assert summary["dpo_minus_sft/win_rate"] == pytest.approx(evals["dpo"]["win_rate"] - evals["sft"]["win_rate"])
    assert summary["status"] == "completed"
    flat = cell.flat_config()
    assert flat["objective"] == stages["sft"]["objective"] and flat["lr"] == stages["sft"]["lr"]
    assert flat["seed"] == results["seed"] and flat["dpo.lr"] == stages["dpo"]["lr"]
    assert flat["dpo.objective"] == stages["dpo"]["objective"] and isinstance(flat["base_seed"], int)

    records = read_metrics(run_dir / "metrics.jsonl")
    for stage, key in (("sft", "train/loss"), ("sft", "kl/token"), ("dpo", "rewards/margins")):
        want = [(r["step"], r[key]) for r in records if r["stage"] == stage and key in r]
        got = [(row["_step"], row[f"{stage}/{key}"]) for row in cell.history if f"{stage}/{key}" in row]
        assert want and got == want, (stage, key)

    for r in (r for r in runs if r.job_type == "eval"):
        label = r.config["evaluated"]
        assert r.name == f"eval-{label}-{results['cell']}"
        assert r.summary[f"eval/{label}/win_rate"] == evals[label]["win_rate"]
        assert not any(key.startswith("eval/win_rate") for key in r.summary)  # no key shared by all stages
        table = json.loads((r.folder / "files" / r.summary["eval/generations"]["path"]).read_text())
        rows = [json.loads(line) for line in (run_dir / "eval" / label / "generations.jsonl").open()]
        assert table["columns"] == TABLE_COLUMNS and len(table["data"]) == min(100, len(rows))
        assert table["data"][0] == [rows[0][c] for c in TABLE_COLUMNS]
    return runs


# --------------------------------------------------------------------------- one pipeline


def test_smoke_pipeline_logs_its_stage_runs_and_one_cell_run(smoke_run):
    check_pipeline_runs(smoke_run)


def test_pipeline_prints_what_it_produced(smoke_run):
    out = (smoke_run.parent / "stdout.txt").read_text()
    results = json.loads((smoke_run / "results.json").read_text())
    assert "win [95% CI]" in out and "pipeline — completed" in out
    dpo = results["eval_by_stage"]["dpo"]
    low, high = dpo["win_rate_ci"]
    row = next(line for line in out.splitlines() if line.strip().startswith("dpo: dpo, 5e-4"))
    assert f"{dpo['win_rate']:.3f} [{low:.2f},{high:.2f}]" in row and f"{dpo['kl_to_ref']:.3f}" in row
    assert str(smoke_run / "results.json") in out and str(smoke_run / "dpo" / "checkpoint") in out


def test_a_nan_failed_stage_and_its_cell_run_exit_non_zero(tmp_path, model_cache):
    proc = ibridge(["debug=smoke", "trainer.num_threads=1", "lr=1e30", "sft.log_every=1", "sft.max_steps=10",
                    "hydra.run.dir=run"], tmp_path, model_cache, check=False)
    assert proc.returncode != 0
    runs = {r.job_type: r for r in runs_of(tmp_path / "run")}
    assert set(runs) == {"eval", "sft", "cell"}  # base eval, the failed SFT, the cell
    assert runs["eval"].exit_code == 0
    for kind in ("sft", "cell"):
        assert runs[kind].exit_code != 0, kind
        assert runs[kind].summary["status"] == "failed" and "NonFiniteLoss" in runs[kind].summary["error"]
    assert "eval/base/win_rate" in runs["cell"].summary and "eval/dpo/win_rate" not in runs["cell"].summary


def test_a_data_error_is_one_line_with_the_traceback_kept_in_error_log(tmp_path, model_cache):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a b", "response": "c d"}\n{"prompt": "a b"}\n')
    proc = ibridge(["train", "debug=smoke", "trainer.num_threads=1", "logger=none", "data=jsonl",
                    "data.path=bad.jsonl", "hydra.run.dir=run"], tmp_path, model_cache, check=False)
    assert proc.returncode == 1
    assert "ibridge: data error: bad.jsonl, line 2: missing field" in proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" in (tmp_path / "run" / "error.log").read_text()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["error"].startswith("data error: bad.jsonl")


# --------------------------------------------------------------------------- pieces, by hand


def test_lr_and_cell_names():
    assert [fmt_lr(x) for x in (1e-4, 5e-4, 0.001, 2.5e-5, 1.0, "1e-3")] == ["1e-4", "5e-4", "1e-3", "2.5e-5", "1e0",
                                                                         "1e-3"]
    cfg = compose_config(["objective=jsd", "lr=1e-4", "seed=2"])
    overrides = ["objective=jsd", "lr=1e-4", "seed=2", "debug=smoke", "trainer.num_threads=1",
                 "model.pretrain.seed=1", "dpo.lr=5e-4", "objective.beta=0.2", "logger=none"]
    assert cell_tag(cfg, overrides) == "jsd-lr1e-4-s2-base1-dpo.lr5e-4-objective.beta=0.2"
    cfg = compose_config(["job=eval", "checkpoint=/x/run/sft/checkpoint"])
    assert cell_tag(cfg, ["checkpoint=/x/run/sft/checkpoint", "seed=0"]) == "sft-s0"


def test_cell_summary_by_hand():
    results = {
        "eval_by_stage": {
            "base": {"win_rate": 0.25, "win_rate_ci": [0.1, 0.4], "gold_reward": 0.5, "avg_length": 3.0,
                     "num_prompts": 8, "judge": "gold"},
            "sft": {"win_rate": 0.5, "win_rate_ci": [0.3, 0.7], "kl_to_ref": 1.5, "implicit_reward_acc": 0.625,
                    "lc_win_rate": float("nan")},
            "dpo": {"win_rate": 0.75, "win_rate_ci": [0.6, 0.9], "kl_to_ref": 0.5, "implicit_reward_acc": 0.875},
        },
        "stages": {"sft": {"steps": 4, "runtime_s": 1.5, "tokens": 100, "kl_token": 0.02, "objective": "jsd"},
                   "dpo": {"steps": 7, "runtime_s": 2.0, "tokens": 300}},
    }
    assert cell_summary(results, "completed") == {
        "status": "completed",
        "eval/base/win_rate": 0.25, "eval/base/win_rate_ci_low": 0.1, "eval/base/win_rate_ci_high": 0.4,
        "eval/base/gold_reward": 0.5, "eval/base/avg_length": 3.0,
        "eval/sft/win_rate": 0.5, "eval/sft/win_rate_ci_low": 0.3, "eval/sft/win_rate_ci_high": 0.7,
        "eval/sft/kl_to_ref": 1.5, "eval/sft/implicit_reward_acc": 0.625,  # NaN lc_win_rate left out
        "eval/dpo/win_rate": 0.75, "eval/dpo/win_rate_ci_low": 0.6, "eval/dpo/win_rate_ci_high": 0.9,
        "eval/dpo/kl_to_ref": 0.5, "eval/dpo/implicit_reward_acc": 0.875,
        "train/sft/steps": 4, "train/sft/runtime_s": 1.5, "train/sft/tokens": 100, "train/sft/kl_token": 0.02,
        "train/dpo/steps": 7, "train/dpo/runtime_s": 2.0, "train/dpo/tokens": 300,
        "dpo_minus_sft/win_rate": 0.25, "dpo_minus_sft/implicit_reward_acc": 0.25,
    }
    assert cell_summary({}, "failed", "NonFiniteLoss: x") == {"status": "failed", "error": "NonFiniteLoss: x"}
    records = [{"stage": "sft", "step": 2, "train/loss": 1.0}, {"stage": "eval", "step": 0, "eval/x": 1.0},
               {"stage": "dpo", "step": 2, "train/loss": 0.5, "note": "text"}, {"stage": "sft", "step": 4,
                                                                                  "train/loss": math.inf}]
    assert stage_history(records) == [(2, {"sft/train/loss": 1.0, "dpo/train/loss": 0.5}), (4, {})]


def test_a_restarted_stage_continues_its_wandb_run_with_the_history_replayed(tmp_path):
    """Two processes' worth of RunLogger: the first stops after step 4 with a state saved at
    step 2; the second continues the same run id from there, as a resumed stage does."""
    cfg = {"backend": "wandb", "mode": "offline", "project": "test"}
    first = RunLogger(tmp_path, cfg, {"lr": 1e-3}, "g", identity={"cell": "c"})
    first.start("sft", "sft-c", home=tmp_path / "sft")
    bookmark = None
    for step in (1, 2, 3, 4):
        first.log({"train/loss": 1.0 / step}, step)
        if step == 2:
            bookmark = first.bookmark()
    first.fail("StopRequested: stopped")
    run_log = json.loads((tmp_path / "sft" / "run_log.json").read_text())
    second = RunLogger(tmp_path, cfg, {"lr": 1e-3}, "g", identity={"cell": "c"})
    second.start("sft", "sft-c", home=tmp_path / "sft")
    second.rewind(bookmark)
    for step in (3, 4, 5):
        second.log({"train/loss": 1.0 / step}, step)
    second.finish()

    (live,) = runs_of(tmp_path)
    (old,) = read_runs(tmp_path / "wandb" / "superseded", "offline-run-*")
    # Seen once under a loaded full suite: the live run without an id. Say what its file held then.
    assert live.id == old.id == run_log["wandb_id"], (
        sorted(p.name for p in (tmp_path / "wandb").rglob("*")),
        [r.WhichOneof("record_type") for r in read_records(next(live.folder.glob("run-*.wandb")))])
    assert old.exit_code == 1 and old.summary["error"] == "StopRequested: stopped"
    assert live.exit_code == 0 and [row["_step"] for row in live.history] == [1, 2, 3, 4, 5]
    assert [row["train/loss"] for row in live.history] == [1.0 / s for s in (1, 2, 3, 4, 5)]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    # A stage run again with no state to resume (and a folder moved aside by resume=false) ...
    third = RunLogger(tmp_path, cfg, {}, "g")
    third.start("sft", "sft-c", home=tmp_path / "sft")
    third.log({"train/loss": 9.0}, 1)
    third.finish()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]  # ... drops its old records
    (tmp_path / "sft" / "run_log.json").unlink()
    fourth = RunLogger(tmp_path, cfg, {}, "g")
    fourth.start("sft", "sft-c", home=tmp_path / "sft")
    fourth.finish()
    ids = {r.id for r in runs_of(tmp_path)}
    assert len(ids) == 2 and live.id in ids  # a folder without run_log.json: a new run id


def test_osh_triggers_a_sync_of_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb_osh")
    cfg = {"backend": "wandb", "mode": "offline", "project": "test", "osh": True, "osh_dir": str(tmp_path / "cmd"),
           "osh_every_s": 3600}
    logger = RunLogger(tmp_path / "run", cfg, {}, "g")
    logger.start("sft", "sft-c")
    logger.log({"train/loss": 1.0}, 1)
    logger.log({"train/loss": 0.5}, 2)  # throttled: one request per hour, plus one at the end
    logger.finish()
    (folder,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    (command,) = (tmp_path / "cmd").glob("*.command")
    assert command.read_text() == str(folder.resolve())

    from ibridge.config import ConfigError

    with pytest.raises(ConfigError, match="logger.mode=offline"):
        RunLogger(tmp_path, {**cfg, "mode": "online"}, {}, "g")
    monkeypatch.setitem(sys.modules, "wandb_osh.hooks", None)  # the extra not installed
    with pytest.raises(ConfigError, match=r"pip install 'ibridge\[osh\]'"):
        RunLogger(tmp_path, cfg, {}, "g")


# --------------------------------------------------------------------------- dashboards


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def referenced_keys(workspace, report) -> dict[str, set[str]]:
    """The config, summary and history keys the round-tripped Workspace and Report read."""
    import wandb_workspaces.reports.v2 as wr

    keys: dict[str, set[str]] = {"config": set(), "summary": set(), "history": set()}

    def metric(value, default: str) -> None:
        if isinstance(value, wr.Config):
            keys["config"].add(value.name)
        elif isinstance(value, wr.SummaryMetric):
            keys["summary"].add(value.name)
        elif isinstance(value, str) and value not in ("Step", "_step"):
            keys[default].add(value)

    def panel(p) -> None:
        if isinstance(p, wr.ParallelCoordinatesPlot):
            for column in p.columns:
                metric(column.metric, "summary")
        elif isinstance(p, wr.ScatterPlot):
            metric(p.x, "summary")
            metric(p.y, "summary")
        elif isinstance(p, wr.BarPlot):
            for m in p.metrics:
                metric(m, "summary")
            metric(p.groupby, "config")
        elif isinstance(p, wr.LinePlot):
            for m in p.y:
                metric(m, "history")
        else:
            raise AssertionError(f"unexpected panel {type(p).__name__}")

    for section in workspace.sections:
        for p in section.panels:
            panel(p)
    for group in workspace.runset_settings.groupby:
        metric(group, "config")
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    for grid in grids:
        for p in grid.panels:
            panel(p)
        for runset in grid.runsets:
            # Round-tripped in the backend's form: "config.<top key>.value[.<rest>]".
            keys["config"].update(g.removeprefix("config.").replace(".value", "", 1) for g in runset.groupby)
    assert len(grids) == 3
    return keys


def test_dashboard_spec_builds_offline_and_round_trips(no_network):
    pytest.importorskip("wandb_workspaces")
    from ibridge.dashboard.spec import (
        Sweep,
        build_report,
        build_workspace,
        report_from_payload,
        report_payload,
        workspace_from_payload,
        workspace_payload,
    )

    sweep = Sweep(group="sweep-2025-01-01-12-00-00", axes=["objective", "lr", "base_seed"], entity="team")
    workspace, report = build_workspace(sweep), build_report(sweep)
    for payload, rebuild in ((workspace_payload(workspace), workspace_from_payload),
                             (report_payload(report), report_from_payload)):
        text = json.dumps(payload)
        again = rebuild(json.loads(text))
        assert (workspace_payload if rebuild is workspace_from_payload else report_payload)(again) == payload
        assert "sweep-2025-01-01-12-00-00" in text and '"cell"' in text
    spec = json.dumps(workspace_payload(workspace)["spec"])
    for view in ("Parallel Coordinates Plot", "Scatter Plot", "Bar Chart", "Run History Line Plot"):
        assert view in spec, view
    keys = referenced_keys(workspace, report)
    assert {"objective", "lr", "base_seed"} <= keys["config"]
    assert {"eval/sft/win_rate", "eval/dpo/win_rate"} <= keys["summary"]
    assert {"sft/train/loss", "sft/implicit/weight", "sft/kl/token", "dpo/rewards/margins"} <= keys["history"]


def test_dashboard_save_while_offline_is_a_config_error(no_network, tmp_path):
    pytest.importorskip("wandb_workspaces")
    from ibridge.config import ConfigError
    from ibridge.jobs import dashboard

    cfg = compose_config(["job=dashboard", f"dashboard.path={tmp_path}", "dashboard.save=true"])
    with pytest.raises(ConfigError, match="dashboard.save=true needs logger.mode=online"):
        dashboard.run(SimpleNamespace(cfg=cfg, results={}))


# --------------------------------------------------------------------------- a sweep (slow)


@pytest.mark.slow
def test_sweep_cells_each_log_their_runs_with_unique_names(two_cell_sweep):
    folders = sorted(p.parent for p in two_cell_sweep.glob("*/results.json"))
    assert len(folders) == 2
    runs = [run for folder in folders for run in check_pipeline_runs(folder)]
    assert len({r.name for r in runs}) == len(runs) == 12
    assert len({r.group for r in runs}) == 1 and next(iter({r.group for r in runs})).startswith("sweep-")
    assert {r.config["ibridge"]["sweep"] for r in runs} == {str(two_cell_sweep.resolve())}
    assert {r.flat_config()["objective"] for r in runs if r.job_type == "cell"} == {"sft", "jsd"}
    out = (two_cell_sweep.parent / "stdout.txt").read_text()
    lines = [line for line in out.splitlines() if re.match(r"\s*\d+\s+objective=(sft|jsd)\b", line)]
    assert len(lines) == 2 and all("completed" in line for line in lines)
    assert "ibridge report report.path=sw" in out  # as the sweep was given: hydra.sweep.dir=sw


@pytest.mark.slow
def test_report_logs_a_report_run_into_the_sweep_group(two_cell_sweep, tmp_path, model_cache):
    ibridge(["report", f"report.path={two_cell_sweep}", "hydra.run.dir=rep"], tmp_path, model_cache)
    (report,) = runs_of(tmp_path / "rep")
    group = json.loads(next(two_cell_sweep.glob("*/results.json")).read_text())["wandb_group"]
    assert report.job_type == "report" and report.group == group and report.exit_code == 0
    cells = json.loads((report.folder / "files" / report.summary["report/cells"]["path"]).read_text())
    assert sorted(row[0] for row in cells["data"]) == ["jsd", "sft"]
    win_rate = cells["columns"].index("eval.dpo.win_rate mean")
    payload = json.loads((two_cell_sweep / "report.json").read_text())
    assert sorted(row[win_rate] for row in cells["data"]) == sorted(
        c["metrics"]["eval"]["dpo"]["win_rate"]["mean"] for c in payload["cells"])
    assert "report/sft_vs_dpo_win_rate" in set(report.summary)
    assert "report/dpo_win_rate_vs_lr" not in set(report.summary)  # one lr in this sweep: no plot against it


@pytest.mark.slow
def test_dashboard_of_the_sweep_reads_only_keys_its_runs_logged(two_cell_sweep, no_network):
    pytest.importorskip("wandb_workspaces")
    from ibridge.dashboard.spec import report_from_payload, workspace_from_payload
    from ibridge.jobs import dashboard

    cfg = compose_config(["job=dashboard", f"dashboard.path={two_cell_sweep}", "logger.entity=team"])
    ctx = SimpleNamespace(cfg=cfg, results={})
    dashboard.run(ctx)
    assert ctx.results["dashboard"]["saved"] is False and ctx.results["dashboard"]["axes"] == ["objective", "lr"]
    workspace = workspace_from_payload(json.loads((two_cell_sweep / "dashboard" / "workspace.json").read_text()))
    report = report_from_payload(json.loads((two_cell_sweep / "dashboard" / "report.json").read_text()))
    cells = [r for r in read_runs(two_cell_sweep, "*/wandb/offline-run-*") if r.job_type == "cell"]
    group = cells[0].group
    assert workspace.entity == "team" and group in workspace.runset_settings.filters
    logged = {"config": set().union(*(r.flat_config() for r in cells)),
              "summary": set().union(*(r.summary for r in cells)),
              "history": set().union(*(r.history_keys() for r in cells))}
    for kind, keys in referenced_keys(workspace, report).items():
        assert keys <= logged[kind], (kind, keys - logged[kind])


@pytest.mark.slow
def test_a_stopped_and_resumed_stage_keeps_one_run_with_the_whole_history(tmp_path, model_cache):
    args = ["train", "debug=smoke", "trainer.num_threads=1", "objective=jsd", "sft.max_steps=120",
            "sft.save_every=8", "sft.log_every=4", "hydra.run.dir=run"]
    env = {**__import__("os").environ, "IBRIDGE_CACHE": str(model_cache), "WANDB_MODE": "offline",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "ibridge", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "run" / "sft" / "state" / "trainer_state.json"
    deadline = time.time() + 120
    while not state.exists():
        assert proc.poll() is None and time.time() < deadline, "no state saved"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0, "the stage finished before SIGTERM: lengthen sft.max_steps"
    ibridge(args, tmp_path, model_cache)

    (live,) = runs_of(tmp_path / "run")
    (stopped,) = read_runs(tmp_path / "run" / "wandb" / "superseded", "offline-run-*")
    assert live.id == stopped.id and live.name == stopped.name
    assert stopped.exit_code != 0 and "StopRequested" in stopped.summary["error"]
    assert live.exit_code == 0
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in records] == list(range(4, 121, 4))
    assert [(row["_step"], row["train/loss"]) for row in live.history if "train/loss" in row] == \
        [(r["step"], r["train/loss"]) for r in records]
