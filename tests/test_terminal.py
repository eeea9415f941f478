"""What ibridge prints fits 80 columns without cutting a number or breaking a path; log lines do
not break progress bars; qlogit, dashboard and export say what they wrote; smoke numbers are labelled."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

from omegaconf import OmegaConf
from rich.console import Console

from ibridge.analysis.tables import print_console
from ibridge.summary import print_run, progress_line, sweep_table
from ibridge.terminal import wrap
from tests.test_report import make_sweep

LONG_PATH = "/scratch/a-rather-long-user-name/ibridge-experiments/outputs/pipeline/objective=jsd,lr=1e-4/run"


def rendered(print_fn, width: int = 80) -> str:
    buffer = io.StringIO()
    print_fn(Console(file=buffer, width=width, highlight=False, color_system=None))
    return buffer.getvalue()


def numbers(text: str) -> set[str]:
    return set(re.findall(r"-?\d+\.\d+", text))


def pipeline_results(run_dir: str = LONG_PATH) -> dict:
    def ev(win, lo, hi, gold, kl, acc):
        return {"win_rate": win, "win_rate_ci": [lo, hi], "gold_reward": gold, "kl_to_ref": kl,
                "implicit_reward_acc": acc}

    return {"job": "pipeline", "status": "completed", "run_dir": run_dir, "runtime_s": 133.2,
            "eval_by_stage": {"base": {"win_rate": 0.0412, "win_rate_ci": [0.0213, 0.0712], "gold_reward": 0.0581},
                              "sft": ev(0.4173, 0.3512, 0.4824, 0.6121, 12.3456, 0.6252),
                              "dpo": ev(0.4801, 0.4133, 0.5478, 0.7333, 3.2109, 0.8755)},
            "stages": {"sft": {"objective": "prior_leaning", "lr": 2.5e-5, "steps": 184, "runtime_s": 45.7,
                               "kl_token": 0.0271, "checkpoint": f"{run_dir}/sft/checkpoint"},
                       "dpo": {"objective": "dpo", "lr": 5e-4, "steps": 188, "runtime_s": 61.3,
                               "checkpoint": f"{run_dir}/dpo/checkpoint"}}}


def check_fits(text: str, width: int = 80) -> None:
    """Every line fits, but for a path (or a command with one) printed whole on a line of its own."""
    for line in text.splitlines():
        whole_path = line.startswith("    ") and "/" in line
        assert len(line.rstrip()) <= width or whole_path, f"{len(line)}: {line}"


def test_a_run_table_fits_80_columns_and_keeps_every_number_whole():
    results = pipeline_results()
    text = rendered(lambda console: print_run(results, console))
    check_fits(text)
    expected = {f"{v:.3f}" for stage in results["eval_by_stage"].values() for k, v in stage.items()
                if k in ("win_rate", "gold_reward", "kl_to_ref", "implicit_reward_acc")}
    expected |= {f"{v:.2f}" for stage in results["eval_by_stage"].values() for v in stage["win_rate_ci"]}
    assert expected <= numbers(text), expected - numbers(text)
    # a path too long for its line gets a line of its own, whole
    assert any(line.strip() == f"{LONG_PATH}/results.json" for line in text.splitlines())


def test_a_smoke_run_is_labelled_as_a_smoke_test():
    text = rendered(lambda console: print_run({**pipeline_results("/tmp/r"), "debug": "smoke"}, console))
    assert "smoke test (debug=smoke)" in text and "numbers say nothing" in text


def test_the_sweep_table_fits_80_columns(tmp_path):
    sweep = make_sweep(tmp_path)
    text = rendered(lambda console: console.print(sweep_table(sweep)))
    check_fits(text)
    rows = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    dpo = [r["eval_by_stage"]["dpo"] for r in rows if r.get("eval_by_stage", {}).get("dpo")]
    assert {f"{d['win_rate']:.3f}" for d in dpo} | {f"{d['gold_reward']:.3f}" for d in dpo} <= numbers(text)


def test_the_report_tables_fit_80_columns(tmp_path):
    sweep = make_sweep(tmp_path)
    from ibridge.analysis.report import summarise

    summary = summarise(sweep)
    text = rendered(lambda console: print_console(console, sweep, summary.cells, summary.runs))
    check_fits(text)
    wide = rendered(lambda console: print_console(console, sweep, summary.cells, summary.runs), width=400)
    assert numbers(wide) <= numbers(text)  # split into tables, not cut: every number of the wide table is there


def test_a_cell_line_wraps_between_words_and_takes_its_time_from_results_json(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({
        "status": "completed", "runtime_s": 85.0,
        "eval_by_stage": {"dpo": {"win_rate": 0.48213, "gold_reward": 0.73712}}}))
    job = SimpleNamespace(
        hydra_cfg=OmegaConf.create({"hydra": {"job": {"num": 3}, "runtime": {"output_dir": str(tmp_path)}}}),
        overrides=["objective=jsd", "lr=1e-4", f"data.path={LONG_PATH}"], status=None, return_value=None)
    text = progress_line(None, job, job_started=0.0, sweep_started=None, width=80)
    lines = text.splitlines()
    assert lines[0] == "ibridge: cell #3 completed in 85 s | dpo win rate 0.482, gold 0.737"
    assert lines[1] == "    objective=jsd lr=1e-4" and lines[2] == f"    data.path={LONG_PATH}"  # never cut


def test_wrap_never_breaks_a_word():
    assert wrap("aaa bbb " + LONG_PATH + " ccc", 30) == ["aaa bbb", f"    {LONG_PATH}", "    ccc"]


def test_log_lines_do_not_break_progress_bars(tmp_path, model_cache):
    # stdout (logs) and stderr (bars) merged, as on a terminal; a log line written while a bar
    # is drawn must start at the beginning of a line (the bar cleared), not after the bar.
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "IBRIDGE_CACHE": str(model_cache), "WANDB_MODE": "offline", "PYTHONPATH": str(REPO),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "ibridge", "train", "debug=smoke", "logger=none", "sft.max_steps=6",
                           "sft.log_every=1", "sft.save_every=1", "hydra.run.dir=run"], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    starts = [m.start() for m in re.finditer(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\]\[ibridge", proc.stdout)]
    during = [s for s in starts if "resumable state" in proc.stdout[s:s + 200]]
    assert len(during) >= 5, proc.stdout[-3000:]  # states saved while the sft bar was drawn
    assert all(s == 0 or proc.stdout[s - 1] in "\n\r" for s in starts), [proc.stdout[s - 60:s + 40] for s in starts]


def test_qlogit_and_dashboard_say_what_they_wrote(tmp_path):
    folder = tmp_path / "qlogit"
    folder.mkdir()
    for name in ("token_heatmap.png", "reward_distribution.png", "qlogit.json"):
        (folder / name).write_text("x")
    results = {"job": "qlogit", "status": "completed", "run_dir": str(tmp_path),
               "qlogit": {"identity_max_abs_error_token": 3.1e-13, "implicit_reward_acc": 0.8125,
                          "auroc_token_reward": 0.6931, "spearman_reward_gold": None, "num_pairs": 200}}
    text = rendered(lambda console: print_run(results, console))
    assert "implicit-reward accuracy" in text and "0.812" in text and "3.1e-13" in text and "200" in text
    for name in ("token_heatmap.png", "reward_distribution.png", "qlogit.json"):
        assert str(folder / name) in text
    check_fits(text)
    results = {"job": "dashboard", "status": "completed", "run_dir": str(tmp_path),
               "dashboard": {"workspace": "sw/dashboard/workspace.json", "report": "sw/dashboard/report.json"}}
    text = rendered(lambda console: print_run(results, console))
    assert "sw/dashboard/workspace.json" in text and "sw/dashboard/report.json" in text


def test_the_smoke_pipeline_prints_in_80_columns(smoke_run):
    out = (smoke_run.parent / "stdout.txt").read_text()
    table = out[out.index("pipeline — completed"):]
    check_fits(table)
    assert "smoke test (debug=smoke)" in table
    assert str(Path(smoke_run) / "results.json") in table
