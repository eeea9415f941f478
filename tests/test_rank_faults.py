"""One rank's failure or SIGTERM must end a 2-process job promptly and cleanly, not hang.

Real torchrun runs on CPU (gloo) through tests/rank_fault_worker.py, which is ibridge's own
CLI with a fault injected into one rank.
"""

from __future__ import annotations

import json
import os
import re
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


def test_one_failing_rank_ends_the_job_with_a_non_zero_exit_without_waiting_for_the_collective_timeout(
        tmp_path, model_cache):
    # The process-group timeout is trainer.dist_timeout_min (60 min by default): a job that waited
    # for it would still run when finish() gives up after 150 s and fails the test.
    proc = launch(tmp_path, model_cache, {"IBRIDGE_TEST_FAIL_RANK": "1"}, "sft.max_steps=40")
    code, err, _ = finish(proc, timeout=150)
    assert code != 0
    assert "injected failure on rank 1" in err
    assert int((tmp_path / "forwards-1").read_text()) == 3  # it failed where injected, not later
    assert not re.search(r"time[d ]?out", err, re.IGNORECASE), "a rank ended by the collective timeout"


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
    state = tmp_path / "run" / "sft" / "state"
    assert state.is_dir(), "rank 0 saved no state: it did not stop with rank 1"
    saved = json.loads((state / "trainer_state.json").read_text())["step"]
    stopped = {int(step) for step in re.findall(r"stopped by (?:SIGTERM|a signal to another rank) after step (\d+)", err)}
    assert stopped == {saved}, (stopped, saved)  # the message names the step the state was saved at
    # Both ranks ran the same number of training forwards (every step has the same micro-batches
    # on every rank, stand-ins included): they stopped after the same step.
    forwards = [int((tmp_path / f"forwards-{rank}").read_text()) for rank in (0, 1)]
    assert forwards[0] == forwards[1] > 0, forwards


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
