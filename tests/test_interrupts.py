"""Ctrl-C, SIGTERM and wandb without credentials end a run with one line and a hint; a resumed
stage's runtime counts the whole stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ibridge.runtime import resolve_runtime
from ibridge.training import OptimSettings, StopRequested, optimise
from tests.conftest import REPO
from tests.test_cli_smoke import ibridge
from tests.test_resume import TRAIN, wait_for


def messages(stderr: str) -> list[str]:
    """stderr's lines other than progress bars (which tqdm redraws with carriage returns)."""
    lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines()]
    return [line for line in lines if line and "|" not in line and not line.startswith("[")]


@pytest.mark.slow
def test_ctrl_c_is_one_line_with_a_hint_and_the_rerun_resumes(tmp_path, model_cache):
    env = {**os.environ, "IBRIDGE_CACHE": str(model_cache), "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    # Its own process group, as a terminal's foreground job: Ctrl-C reaches every process in it.
    proc = subprocess.Popen([sys.executable, "-m", "ibridge", *TRAIN, "hydra.run.dir=run"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(tmp_path / "run" / "sft" / "state" / "trainer_state.json", proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    (line,) = messages(stderr)
    assert line.startswith("ibridge: interrupted (Ctrl-C); run the same command to resume (sft resumes from step ")
    assert "error.log" in line and "KeyboardInterrupt" in (tmp_path / "run" / "error.log").read_text()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and results["error"] == "interrupted (Ctrl-C)"
    ibridge([*TRAIN, "hydra.run.dir=run"], tmp_path, model_cache)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed" and results["stages"]["sft"]["resumed_from_step"] > 0
    assert not (tmp_path / "run" / "error.log").exists(), "the interrupted attempt's error.log outlived the rerun"


def test_online_wandb_without_credentials_is_one_line_before_anything_loads(tmp_path, model_cache):
    env = {"HOME": str(tmp_path), "WANDB_API_KEY": "", "NETRC": str(tmp_path / "no-netrc")}
    proc = ibridge(["train", "debug=smoke", "logger.mode=online", "hydra.run.dir=out/run"], tmp_path, model_cache,
                   check=False, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "logger.mode=online: no wandb credentials" in proc.stderr and "wandb login" in proc.stderr
    assert not (tmp_path / "out").exists()  # stopped before the run folder was kept


def test_wandb_credentials_found_in_the_environment_or_netrc(tmp_path, monkeypatch):
    from ibridge.wandb_check import online_problem

    logger = {"backend": "wandb", "mode": "online"}
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert "no wandb credentials" in online_problem(logger)
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    assert online_problem(logger) is None
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a key for another server is no key
    assert "wandb.example.org" in online_problem(logger)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert online_problem(logger) is None
    assert online_problem({"backend": "wandb", "mode": "offline"}) is None


class FakeClock:
    """time.perf_counter for the loop: advances one second per training step computed."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(tmp_path: Path, clock: FakeClock, stop_at: int | None):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    items = [{"x": torch.randn(2)} for _ in range(12)]

    class Out:
        def __init__(self, loss):
            self.loss, self.metrics = loss, {}

    steps = {"n": 0}

    def compute(model, batch):
        clock.now += 1.0
        steps["n"] += 1
        if stop_at is not None and steps["n"] == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop: save after this step, stop
        return Out(model(batch["x"]).pow(2).mean())

    def collate(rows):
        return {"x": torch.stack([r["x"] for r in rows]), "attention_mask": torch.ones(len(rows), 1)}

    settings = OptimSettings(lr=0.1, max_steps=12, batch_size=1, log_every=2, save_every=2)
    return optimise(model, items, collate, compute, settings, resolve_runtime({"device": "cpu"}),
                    state_dir=tmp_path / "state", count_units=lambda batch: batch["x"].shape[0])


def test_a_resumed_stage_reports_the_runtime_of_the_whole_stage(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("ibridge.training.time.perf_counter", clock)
    straight = _run(tmp_path / "a", clock, stop_at=None)
    assert straight.runtime_s == 12.0  # twelve steps of one (fake) second
    clock.now = 100.0
    with pytest.raises(StopRequested):
        _run(tmp_path / "b", clock, stop_at=5)  # stops after step 5, the step the signal came in
    resumed = _run(tmp_path / "b", clock, stop_at=None)
    assert resumed.resumed_from == 5
    assert resumed.runtime_s == straight.runtime_s  # 5 s before the stop + 7 s after it
