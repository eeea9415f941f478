"""Which processes form one training job: torchrun's variables, or the tasks of a Slurm step.

docs/design.md §3 (the command line) and §4 (architecture): every process of a data-parallel
job runs the same Hydra app, and ``ibridge.distributed.init_distributed`` joins them into one
process group. This module says whether there is such a job and what this process is in it:

* ``torchrun`` (and ``accelerate launch``, which starts torchrun): ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` are set.
* a Slurm step of several tasks (``srun --ntasks N``, or ``ibridge -m hydra/launcher=slurm``
  with ``tasks_per_node`` x ``nodes`` > 1): rank, world size, local rank and the master
  address come from Slurm's ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID`` and
  the step's first node; the port is derived from the job id, so every task computes the same.
  (``SLURM_NTASKS`` alone is not enough: a batch script's own shell has it too, as one process.)

It also refuses the launches that would silently run several independent copies of a job
into one folder, or a data-parallel trainer in one process (``check``, a ``ConfigError``).
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from ibridge.config import ConfigError

DATA_PARALLEL_MODES = ("ddp", "fsdp", "deepspeed")
# Ports for the rendezvous of a Slurm cell: high enough to miss well-known services, below the
# usual ephemeral range (32768-60999 on Linux) only in part, as submitit's own choice (20000-60000).
PORT_RANGE = (20000, 60000)


@dataclass(frozen=True)
class LaunchEnv:
    source: str  # "torchrun" | "slurm" | "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def multi_process(self) -> bool:
        return self.world_size > 1


def slurm_job_id(environ: Mapping[str, str] = os.environ) -> str | None:
    """The id `squeue`/`scontrol` know the job by: ``<array id>_<task>`` for an array task
    (Hydra's Slurm launcher submits a sweep as one array), else ``SLURM_JOB_ID``; None outside Slurm."""
    array, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return environ.get("SLURM_JOB_ID") or None


def requeue_count(environ: Mapping[str, str] = os.environ) -> int:
    """How many times Slurm has requeued this job (preemption, time limit, `scontrol requeue`)."""
    return int(environ.get("SLURM_RESTART_COUNT", "0") or 0)


def slurm_step_tasks(environ: Mapping[str, str] = os.environ) -> int:
    """Tasks of the Slurm step this process belongs to (1 outside a step, e.g. in a batch script)."""
    return int(environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[003-005,9],cpu1`` -> ``gpu003``."""
    match = re.match(r"\s*([^,\[\s]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        raise ValueError(f"cannot read a host from the Slurm node list {nodelist!r}")
    prefix, ranges = match.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def rendezvous_port(job_id: str, requeues: int = 0) -> int:
    """A port every task of one job attempt computes alike (a requeued attempt gets another,
    so that a port still in TIME_WAIT from the killed attempt is not reused)."""
    low, high = PORT_RANGE
    return low + zlib.crc32(f"{job_id}/{requeues}".encode()) % (high - low)


def detect(environ: Mapping[str, str] = os.environ) -> LaunchEnv:
    """This process's place in a multi-process job, or ``source="none"``."""
    if "WORLD_SIZE" in environ:
        world = int(environ["WORLD_SIZE"])
        local_world = int(environ.get("LOCAL_WORLD_SIZE", world))
        port = environ.get("MASTER_PORT")
        return LaunchEnv("torchrun", int(environ.get("RANK", "0")), world, int(environ.get("LOCAL_RANK", "0")),
                         local_world, environ.get("MASTER_ADDR"), int(port) if port else None)
    tasks = slurm_step_tasks(environ)
    if tasks > 1 and "SLURM_PROCID" in environ:
        nodes = int(environ.get("SLURM_STEP_NUM_NODES", environ.get("SLURM_JOB_NUM_NODES", "1")) or 1)
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "localhost"
        port = environ.get("MASTER_PORT")
        return LaunchEnv(
            "slurm", rank=int(environ["SLURM_PROCID"]), world_size=tasks,
            local_rank=int(environ.get("SLURM_LOCALID", "0")),
            local_world_size=max(1, tasks // nodes),
            master_addr=environ.get("MASTER_ADDR") or first_host(nodelist),
            master_port=int(port) if port else rendezvous_port(slurm_job_id(environ) or "0", requeue_count(environ)))
    return LaunchEnv("none")


def check(mode: str, launch: LaunchEnv, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse what would run silently wrong, before any model loads (one line each).

    * a data-parallel trainer in a process that no launcher started as part of a job;
    * several processes (Slurm tasks, torchrun ranks) without a data-parallel trainer: each
      would run the whole job alone, into the same run folder;
    * several Slurm tasks that each started a torchrun job of their own.
    """
    if mode in DATA_PARALLEL_MODES and launch.source == "none":
        raise ConfigError(
            f"trainer.distributed={mode} needs several processes that form one job, and this process was "
            "started alone: launch it with `torchrun --nproc_per_node N -m ibridge ...`, `srun --ntasks N "
            "ibridge ...`, or `ibridge -m hydra/launcher=slurm hydra.launcher.tasks_per_node=N ...` "
            "(docs/real_setting.md#slurm); for one process use trainer=auto")
    if mode not in DATA_PARALLEL_MODES and launch.multi_process:
        where = (f"Slurm task {launch.rank} of {launch.world_size} (job {slurm_job_id(environ)})"
                 if launch.source == "slurm" else f"rank {launch.rank} of {launch.world_size} ({launch.source})")
        raise ConfigError(
            f"this process is {where} but trainer.distributed={mode!r} runs one process: every process "
            "would run the whole job alone into the same folder; use trainer=ddp, trainer=fsdp or "
            "trainer=deepspeed, or launch one process (hydra.launcher.tasks_per_node=1)")
    steps = slurm_step_tasks(environ)
    groups = environ.get("GROUP_WORLD_SIZE")  # torchrun's number of nodes (agents) in its job
    if launch.source == "torchrun" and steps > 1 and groups is not None and int(groups) != steps:
        raise ConfigError(
            f"{steps} Slurm tasks each started a torchrun job of its own ({groups} node(s), WORLD_SIZE="
            f"{launch.world_size}): run one Slurm task per node, and give torchrun --nnodes "
            f"{steps} --node_rank $SLURM_NODEID and one --master_addr, or use hydra/launcher=slurm_torchrun")


def export(launch: LaunchEnv) -> None:
    """Set torch's ``env://`` variables from a Slurm step (what torchrun would have set)."""
    if launch.source != "slurm":
        return
    os.environ.update({
        "RANK": str(launch.rank), "WORLD_SIZE": str(launch.world_size), "LOCAL_RANK": str(launch.local_rank),
        "LOCAL_WORLD_SIZE": str(launch.local_world_size), "MASTER_ADDR": str(launch.master_addr),
        "MASTER_PORT": str(launch.master_port),
    })


def cuda_device_index(local_rank: int, local_world_size: int, visible: int) -> int:
    """The CUDA device of a rank among the `visible` ones. Slurm either shows every task all of
    its node's GPUs (then rank i takes GPU i) or binds one GPU to each task (`--gpus-per-task=1`,
    `--gpu-bind`: each sees one, device 0)."""
    if visible == 1:
        return 0
    if visible >= local_world_size:
        return local_rank
    raise ConfigError(
        f"{local_world_size} ranks on this node but {visible} GPUs visible to rank {local_rank}: give each "
        "rank one GPU (hydra.launcher.gpus_per_node = tasks_per_node, or --gpus-per-task=1)")


def identity(world_size: int, environ: Mapping[str, str] = os.environ) -> dict:
    """What a run records about how it was launched (results.json, stage.json, wandb config):
    its world size, and under Slurm the job id and how many times it was requeued."""
    out: dict = {"world_size": world_size}
    job = slurm_job_id(environ)
    if job is not None:
        out["slurm_job_id"] = job
        out["requeues"] = requeue_count(environ)
    return out
