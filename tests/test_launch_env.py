"""Which processes form one job (ibridge/launch_env.py), and the launches refused before a model loads."""

from __future__ import annotations

import json
import re

import pytest

from ibridge.config import ConfigError
from ibridge.launch_env import (
    LaunchEnv,
    check,
    cuda_device_index,
    detect,
    first_host,
    identity,
    rendezvous_port,
)
from tests.conftest import ibridge

# What srun sets in each task of `srun --ntasks 2` on one node (seen on the test Slurm).
STEP = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "1",
        "SLURM_JOB_NUM_NODES": "1", "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_JOB_NODELIST": "gpu[007-008]"}


def task(rank: int, local: int, **extra) -> dict:
    return {**STEP, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(local), **extra}


@pytest.mark.parametrize("nodelist, host", [("vm", "vm"), ("gpu[003-005,9],cpu1", "gpu003"), ("a-b[1,3]", "a-b1"),
                                            ("n12,n13", "n12"), ("node[0042]", "node0042")])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_every_task_of_a_slurm_step_is_one_rank_of_one_job():
    envs = [detect(task(r, r)) for r in range(2)]
    assert [e.source for e in envs] == ["slurm", "slurm"]
    assert [(e.rank, e.world_size, e.local_rank, e.local_world_size) for e in envs] == [(0, 2, 0, 2), (1, 2, 1, 2)]
    # every task computes the same rendezvous, on the step's first node
    assert {(e.master_addr, e.master_port) for e in envs} == {("gpu007", rendezvous_port("77"))}


def test_a_requeued_job_meets_on_another_port_and_an_array_element_is_named_like_squeue():
    assert rendezvous_port("77", 1) != rendezvous_port("77", 0)
    env = task(0, 0, SLURM_ARRAY_JOB_ID="70", SLURM_ARRAY_TASK_ID="3", SLURM_RESTART_COUNT="2")
    assert identity(2, env) == {"world_size": 2, "slurm_job_id": "70_3", "requeues": 2}
    assert detect(env).master_port == rendezvous_port("70_3", 2)
    assert identity(1, {}) == {"world_size": 1}


def test_a_batch_script_is_one_process_and_torchrun_wins_over_slurm():
    # sbatch's own shell has SLURM_NTASKS but no step: one process, not a rank.
    assert detect({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_ID": "5"}).source == "none"
    env = detect({**task(0, 0), "WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "5", "MASTER_ADDR": "h",
                  "MASTER_PORT": "29500"})
    assert (env.source, env.rank, env.world_size, env.master_port) == ("torchrun", 5, 8, 29500)


@pytest.mark.parametrize("mode, environ, message", [
    ("ddp", {}, "started alone"),
    ("fsdp", {"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}, "started alone"),  # a batch script, not a step
    ("none", task(1, 1), "Slurm task 1 of 2 (job 77)"),
    ("none", {"WORLD_SIZE": "2", "RANK": "0"}, "rank 0 of 2 (torchrun)"),
    # `srun --ntasks 2 torchrun --nproc_per_node 2`: two torchrun jobs of one node each
    ("ddp", {**task(0, 0), "WORLD_SIZE": "2", "RANK": "0", "GROUP_WORLD_SIZE": "1"}, "each started a torchrun"),
])
def test_launches_that_would_run_silently_wrong_are_config_errors(mode, environ, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check(mode, detect(environ), environ)


@pytest.mark.parametrize("mode, environ", [
    ("none", {}),
    ("ddp", task(1, 1)),
    ("fsdp", {"WORLD_SIZE": "2", "RANK": "1"}),
    ("none", {"WORLD_SIZE": "1", "RANK": "0"}),  # torchrun --nproc_per_node 1
    ("deepspeed", {**task(0, 0), "SLURM_STEP_NUM_TASKS": "2", "WORLD_SIZE": "16", "RANK": "0",
                   "GROUP_WORLD_SIZE": "2"}),  # one torchrun per node of a 2-node step
])
def test_launches_that_form_one_job_pass(mode, environ):
    check(mode, detect(environ), environ)


def test_a_rank_takes_its_own_gpu_or_the_one_slurm_bound_to_it():
    assert cuda_device_index(local_rank=3, local_world_size=8, visible=8) == 3
    assert cuda_device_index(local_rank=3, local_world_size=8, visible=1) == 0  # --gpus-per-task=1
    with pytest.raises(ConfigError, match="8 ranks on this node but 4 GPUs"):
        cuda_device_index(local_rank=3, local_world_size=8, visible=4)


def test_launch_env_is_frozen():
    with pytest.raises(AttributeError):
        LaunchEnv("none").rank = 1  # type: ignore[misc]


def test_a_data_parallel_trainer_in_one_process_is_a_one_line_config_error(tmp_path, model_cache):
    # Before: the run went on as a single process, and its record said nothing of it.
    proc = ibridge(["train", "debug=smoke", "trainer=ddp", "hydra.run.dir=run"], tmp_path, model_cache, check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ibridge: config error: ")]
    assert len(errors) == 1 and "trainer.distributed=ddp needs several processes" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "sft").exists()


def test_two_slurm_tasks_without_a_data_parallel_trainer_are_refused(tmp_path, model_cache):
    proc = ibridge(["train", "debug=smoke", "hydra.run.dir=run"], tmp_path, model_cache, check=False, env=task(1, 1))
    assert proc.returncode == 2 and "config error: this process is Slurm task 1 of 2 (job 77)" in proc.stderr


def test_a_run_under_slurm_records_its_job_and_requeues(tmp_path, model_cache):
    """A single-process `train` in a Slurm job (a batch script): results.json, stage.json and the
    wandb run's config carry the job id and requeue count; stderr, not a terminal, gets progress
    lines (ibridge/progress.py), not carriage-return bars."""
    from tests.wandb_offline import read_runs

    env = {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1", "IBRIDGE_PROGRESS_SECONDS": "0"}
    proc = ibridge(["train", "debug=smoke", "sft.max_steps=4", "sft.log_every=2", "hydra.run.dir=run"], tmp_path,
                   model_cache, env=env)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (results["world_size"], results["slurm_job_id"], results["requeues"]) == (1, "4242", 1)
    stage = json.loads((tmp_path / "run" / "sft" / "stage.json").read_text())
    assert (stage["slurm_job_id"], stage["requeues"]) == ("4242", 1)
    (run,) = read_runs(tmp_path / "run")
    assert run.config["ibridge"]["slurm_job_id"] == "4242" and run.config["ibridge"]["world_size"] == 1
    assert "\r" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sft (sft): step ")]
    assert [line.split()[3] for line in lines] == ["1/4", "2/4", "3/4", "4/4"], proc.stderr[-2000:]
