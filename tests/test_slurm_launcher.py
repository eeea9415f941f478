"""The Slurm launcher's parts that need no Slurm: cell shapes, the cause of a failed cell,
waiting without sacct, and its configs (ibridge/slurm/; the real cluster: tests/slurm/)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from ibridge.config import ConfigError
from ibridge.slurm.cell import TaskOutcome
from ibridge.slurm.launcher import check_cell, check_shape
from ibridge.slurm.outcome import (
    Failure,
    TaskResult,
    cell_failure,
    last_line,
    read_task,
    record_failure,
    root_cause,
)
from ibridge.slurm.queue import GONE, parse_squeue, wait_for_jobs
from tests.conftest import ibridge

PAPER_CELL = {"tasks_per_node": 8, "gpus_per_node": 8, "nodes": 1, "timeout_min": 720, "signal_delay_s": 600}


def test_the_configs_describe_an_8_gpu_cell_of_8_ranks():
    for name, ranks_key in (("slurm", "tasks_per_node"), ("slurm_torchrun", "nproc_per_node")):
        cfg = OmegaConf.load(Path(__file__).parent.parent / "conf" / "hydra" / "launcher" / f"{name}.yaml")
        assert cfg[ranks_key] == cfg.gpus_per_node == 8 and cfg.nodes == 1, name
        assert cfg.max_num_timeout > 0 and 0 < cfg.signal_delay_s <= cfg.timeout_min * 30, name
        check_shape(OmegaConf.to_container(cfg))


@pytest.mark.parametrize("change, message", [
    ({"gpus_per_node": 4}, "gpus_per_node=4 but 8 rank"),
    ({"tasks_per_node": 1}, "gpus_per_node=8 but 1 rank"),  # 7 GPUs would idle
    ({"nproc_per_node": 8}, "needs tasks_per_node=1"),
    ({"timeout_min": 10}, "signal_delay_s=600 is more than half the time limit"),
])
def test_cell_shapes_that_do_not_fit_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        check_shape({**PAPER_CELL, **change})


def test_ranks_and_trainer_must_agree():
    check_cell(OmegaConf.create({"trainer": {"distributed": "fsdp"}}), 0, 8)
    check_cell(OmegaConf.create({"trainer": {"distributed": "none"}}), 0, 1)
    with pytest.raises(ConfigError, match="cell #3: 8 ranks per cell .* trainer.distributed=none"):
        check_cell(OmegaConf.create({"trainer": {"distributed": "none"}}), 3, 8)
    with pytest.raises(ConfigError, match="cell #0: trainer.distributed=ddp but one rank"):
        check_cell(OmegaConf.create({"trainer": {"distributed": "ddp"}}), 0, 1)


def test_a_misfit_cell_stops_the_sweep_before_anything_is_submitted(tmp_path, model_cache):
    proc = ibridge(["-m", "train", "debug=smoke", "lr=1e-3,5e-4", "hydra/launcher=slurm", "hydra.sweep.dir=sw"],
                   tmp_path, model_cache, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "ibridge: config error: cell #0: 8 ranks per cell (hydra.launcher) but trainer.distributed=none" \
        in proc.stderr
    assert not (tmp_path / "sw" / ".submitit").exists()


def test_the_installed_command_finds_the_slurm_launcher_outside_the_checkout(tmp_path, model_cache):
    """The `ibridge` script as installed, run from a folder of the user's own with nothing of the
    checkout on the path. Under an editable install Hydra's plugin scan cannot list the
    checkout's hydra_plugins/, so the launcher's config ("Could not load
    'hydra/launcher/ibridge_slurm'") and class ("Unknown plugin class") were unknown there; the
    tests that set PYTHONPATH to the checkout never saw it. Reaching the cell check means Hydra
    composed the config and instantiated the launcher."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(IBRIDGE_CACHE=str(model_cache), WANDB_MODE="offline")
    script = Path(sys.executable).parent / "ibridge"
    proc = subprocess.run([str(script), "-m", "train", "debug=smoke", "lr=1e-3,5e-4", "hydra/launcher=slurm",
                           "hydra.sweep.dir=sw"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "ibridge: config error: cell #0: 8 ranks per cell (hydra.launcher) but trainer.distributed=none" \
        in proc.stderr, proc.stderr[-2000:]


def test_the_cause_is_the_failure_that_is_not_a_consequence_of_another():
    injected = Failure(1, "rank 1 of 2: RuntimeError: injected failure on rank 1", ended_at=20.0)
    closed = Failure(0, "rank 0: RuntimeError: [gloo/transport/tcp/pair.cc:534] Connection closed by peer",
                     ended_at=19.0)  # stamped first, but a consequence
    assert root_cause([closed, injected]) == injected
    # all consequences: the earliest (an unknown time is last)
    assert root_cause([Failure(1, "Connection reset by peer", None), Failure(0, "stopped by SIGTERM", 5.0)]).rank == 0
    both = [Failure(1, "ValueError: b", 3.0), Failure(0, "ValueError: a", 2.0)]
    assert root_cause(both).rank == 0  # the earlier of two causes
    assert root_cause([]) is None


def test_the_error_line_of_a_task_traceback():
    trace = ('Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
             'ibridge.slurm.cell.RankFailed: rank 1 of 2: RuntimeError: boom\n')
    assert last_line(trace) == "rank 1 of 2: RuntimeError: boom"
    assert last_line("Traceback ...\nsubmitit.core.utils.UncompletedJobError: Job not requeued because: timed-out "
                     "too many times.\n") == "UncompletedJobError: Job not requeued because: timed-out too many times."


def _pickle(path: Path, value) -> Path:
    path.write_bytes(pickle.dumps(value))
    return path


def test_a_cell_with_a_failed_rank_is_recorded_failed_keeping_what_rank_0_wrote(tmp_path):
    ok = TaskOutcome(rank=0, world_size=2, job_return=None, error="RuntimeError: Connection closed by peer",
                     ended_at=2.0)
    tasks = [read_task(0, _pickle(tmp_path / "0.pkl", ("success", ok))),
             read_task(1, _pickle(tmp_path / "1.pkl", ("error", "Traceback\nRankFailed: rank 1 of 2: OSError: disk")))]
    error = cell_failure(tasks, "12_3", "FAILED", tmp_path / "log.err")
    assert error == "rank 1 of 2: OSError: disk (Slurm job 12_3, FAILED)"
    cell = tmp_path / "cell"
    cell.mkdir()
    (cell / "results.json").write_text(json.dumps({"status": "failed", "error": "RuntimeError: Connection closed by "
                                                   "peer", "stages": {"sft": {"steps": 3}}}))
    record = record_failure(cell, error, {"slurm_job_id": "12_3"})
    on_disk = json.loads((cell / "results.json").read_text())
    assert on_disk == record and record["status"] == "failed" and record["error"] == error
    assert record["stages"] == {"sft": {"steps": 3}} and record["rank0_error"].startswith("RuntimeError: Conn")
    assert cell_failure([read_task(0, _pickle(tmp_path / "2.pkl", ("success", TaskOutcome(0, 1, None, None, 1.0))))],
                        "1", None, tmp_path / "e") is None


def test_a_cell_whose_tasks_left_nothing_is_failed_with_the_job_state(tmp_path):
    error = cell_failure([TaskResult(0), TaskResult(1)], "9_0", "OUT_OF_MEMORY", tmp_path / "9_0_0_log.err")
    assert error.startswith("2 of 2 tasks ended without a result (Slurm job 9_0, OUT_OF_MEMORY;")
    assert error.endswith("9_0_0_log.err")


def test_squeue_lines():
    text = "12_0|RUNNING\n12_1|PENDING\n12_2|CANCELLED by 0\n\n"
    assert parse_squeue(text) == {"12_0": "RUNNING", "12_1": "PENDING", "12_2": "CANCELLED"}


def test_waiting_ends_a_job_on_its_results_or_after_a_grace_once_slurm_says_it_ended(tmp_path):
    """Job 0 writes its result files; job 1 is requeued (PENDING after RUNNING) and then gone
    from the queue without results: done only after the grace period, once seen ended."""
    results0 = [tmp_path / "a0", tmp_path / "a1"]
    jobs = [SimpleNamespace(job_id="5_0"), SimpleNamespace(job_id="5_1")]
    timeline = iter([{"5_0": "RUNNING", "5_1": "RUNNING"}, {"5_0": "RUNNING", "5_1": "REQUEUED"},
                     {"5_0": "COMPLETING", "5_1": "PENDING"}, None,  # squeue failed: nothing concluded
                     {"5_1": "RUNNING"}, {"5_1": GONE}, {"5_1": GONE}, {"5_1": GONE}])
    calls, done = [], []
    clock = iter(range(0, 1000, 10))  # 10 s per round

    def states(ids):
        calls.append(list(ids))
        value = next(timeline)
        if len(calls) == 3:
            for path in results0:
                path.write_text("x")
        return value

    wait_for_jobs(jobs, lambda job: results0 if job.job_id == "5_0" else [tmp_path / "never"],
                  lambda index, state: done.append((index, state, len(calls))), poll_s=0, grace_s=15,
                  states=states, clock=lambda: next(clock))
    # job 1: gone at round 6 (t=50), still waited for at round 7 (t=60), done at round 8 (t=70)
    assert done == [(0, "COMPLETING", 3), (1, GONE, 8)]
