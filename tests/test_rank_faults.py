"""One rank's failure or SIGTERM must end a 2-process job promptly and cleanly, not hang.

Real torchrun runs on CPU (gloo) through tests/rank_fault_worker.py, which is ibridge's own
CLI with a fault injected into one rank.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.torchrun import torchrun_command

pytestmark = pytest.mark.slow


def launch(cwd: Path, model_cache: Path, extra_env: dict, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "IBRIDGE_CACHE": str(model_cache), "WANDB_MODE": "offline", "PYTHONPATH": str(REPO),
           **extra_env}
    cmd = torchrun_command(str(REPO / "tests" / "rank_fault_worker.py"), "train", "debug=smoke", "trainer=ddp",
                           "trainer.num_threads=1", "sft.log_every=2", "hydra.run.dir=run", *overrides)
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
    start = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every rank it started
        _, err = proc.communicate()
        pytest.fail(f"the job still ran {timeout:.0f} s later (hung in a collective)\n{err[-3000:]}")
    return proc.returncode, err, time.monotonic() - start


def test_one_failing_rank_ends_the_job_in_seconds_with_a_non_zero_exit(tmp_path, model_cache):
    proc = launch(tmp_path, model_cache, {"IBRIDGE_TEST_FAIL_RANK": "1"}, "sft.max_steps=40")
    code, err, _ = finish(proc, timeout=150)
    assert code != 0
    assert "injected failure on rank 1" in err


def test_sigterm_to_one_rank_stops_both_at_the_same_step_with_a_saved_state(tmp_path, model_cache):
    proc = launch(tmp_path, model_cache, {}, "sft.max_steps=400", "sft.save_every=1000")
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("train/loss") >= 1):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no training step was logged"
        time.sleep(0.2)
    os.kill(int((tmp_path / "pid-1").read_text()), signal.SIGTERM)  # rank 1 alone
    code, err, _ = finish(proc, timeout=150)
    assert code != 0
    assert "stopped by SIGTERM" in err
    state = tmp_path / "run" / "sft" / "state"
    assert state.is_dir(), "rank 0 saved no state: it did not stop with rank 1"


def test_a_two_process_pipeline_killed_after_the_base_evaluation_resumes_to_the_end(tmp_path, model_cache):
    env = {**os.environ, "IBRIDGE_CACHE": str(model_cache), "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}

    def command():
        return torchrun_command("-m", "ibridge", "debug=smoke", "trainer=ddp", "trainer.num_threads=1",
                                "hydra.run.dir=run")

    first = subprocess.Popen(command(), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    marker = tmp_path / "run" / "eval" / "base" / "eval.json"
    deadline = time.monotonic() + 180
    while not marker.is_file():
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the base evaluation never finished"
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    second = subprocess.Popen(command(), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    code, err, _ = finish(second, timeout=300)
    assert code == 0, err[-3000:]
    results = (tmp_path / "run" / "results.json").read_text()
    assert '"status": "completed"' in results
