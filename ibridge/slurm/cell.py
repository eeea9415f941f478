"""What one Slurm task of a cell runs: one rank of the cell's job, preemption-safe.

Every task of the cell's step runs the same Hydra job (``ibridge.cli.run``) with the same
overrides; ``ibridge.distributed.init_distributed`` joins them into one process group from
Slurm's environment (ibridge/launch_env.py), and rank 0 alone writes the cell folder (and
Hydra's ``.hydra/`` files). What a task returns (:class:`TaskOutcome`) or raises goes back to
the submitting process through submitit's result files (ibridge/slurm/outcome.py).

Preemption and time limits (docs/real_setting.md#slurm): Slurm sends submitit's signal
(``USR2``, ``signal_delay_s`` before the time limit, or at preemption with
``PreemptParameters=send_user_signal``) to every task. Inside the training loop it stops the
stage at the next logging step on every rank with a saved state (ibridge/preemption.py);
rank 0 then requeues the job through submitit (which counts time-outs against
``max_num_timeout``), and the requeued job resumes in the same folder. Anywhere else (loading,
the reference pass, an evaluation) rank 0 requeues at once: finished stages and evaluations
are kept, the phase under way starts again.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass

from ibridge import launch_env, preemption


class RankFailed(RuntimeError):
    """A rank other than 0 failed: raised so that its task exits non-zero (srun then ends the step)."""


@dataclass
class TaskOutcome:
    rank: int
    world_size: int
    job_return: object | None  # Hydra's JobReturn, from rank 0 only
    error: str | None  # this rank's one-line error, if its run failed
    ended_at: float  # time.time() when the run ended (the earliest failure is the cause)


def preemption_signal() -> int:
    """The signal submitit asks Slurm for (``#SBATCH --signal=USR2@<signal_delay_s>``)."""
    from submitit import JobEnvironment

    return JobEnvironment._usr_sig()


def run_hydra_job(launcher, args: tuple, writes_cell: bool):
    """Hydra's submitit launcher's job body (``BaseSubmititLauncher.__call__``), except that only
    the rank that writes the cell folder saves ``.hydra/`` and Hydra's job log (``<job>.log``) in it."""
    import submitit
    from hydra.core.singleton import Singleton
    from hydra.core.utils import run_job, setup_globals
    from omegaconf import OmegaConf, open_dict, read_write

    sweep_overrides, job_dir_key, job_num, _job_id, singleton_state = args
    Singleton.set_state(singleton_state)
    setup_globals()
    sweep_config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(sweep_overrides))
    with open_dict(sweep_config.hydra.job) as job:
        job.id = submitit.JobEnvironment().job_id
        sweep_config.hydra.job.num = job_num
    if not writes_cell:
        with read_write(sweep_config.hydra), open_dict(sweep_config.hydra):
            sweep_config.hydra.output_subdir = None
            logging_cfg = OmegaConf.select(sweep_config, "hydra.job_logging")
            if logging_cfg is not None and "file" in (logging_cfg.get("handlers") or {}):
                del logging_cfg.handlers["file"]  # the console (this task's Slurm log) only
                root = logging_cfg.get("root") or {}
                if "file" in (root.get("handlers") or []):
                    root.handlers = [name for name in root.handlers if name != "file"]
    return run_job(hydra_context=launcher.hydra_context, task_function=launcher.task_function,
                   config=sweep_config, job_dir_key=job_dir_key, job_subdir_key="hydra.sweep.subdir")


def run_error(job_return) -> str | None:
    """The run's error: an exception Hydra caught, or ibridge's own ``failed`` results (a sweep
    cell records its error and returns, so that the sweep goes on)."""
    from hydra.core.utils import JobStatus

    value = getattr(job_return, "_return_value", None)
    if getattr(job_return, "status", None) == JobStatus.FAILED:
        return f"{type(value).__name__}: {value}"
    if isinstance(value, dict) and value.get("status") == "failed":
        return str(value.get("error") or "failed")
    return None


def task_outcome(job_return, launch: launch_env.LaunchEnv) -> TaskOutcome:
    """Rank 0's outcome carries the JobReturn; another rank's failure is raised (RankFailed)."""
    error = run_error(job_return)
    if error is not None and launch.rank != 0:
        raise RankFailed(f"rank {launch.rank} of {launch.world_size}: {error}")
    return TaskOutcome(rank=launch.rank, world_size=launch.world_size,
                       job_return=job_return if launch.rank == 0 else None, error=error, ended_at=time.time())


def arm_preemption(signum: int, on_idle) -> None:
    """`signum` stops the training loop like SIGTERM; outside the loop `on_idle(signum, frame)` runs."""
    preemption.add_preemption_signal(signum)

    def handler(received, frame):
        preemption.note(received)
        on_idle(received, frame)

    signal.signal(signum, handler)


def requeue_or_leave(rank: int, requeue) -> None:
    """After a preemption: rank 0 requeues the job through submitit's handler (it saves the
    submission, runs `scontrol requeue` and exits; past `max_num_timeout` it raises instead, and
    the cell fails saying why); the other ranks leave quietly, as Slurm's requeue ends them anyway."""
    if rank == 0:
        requeue(preemption_signal(), None)
    raise SystemExit(0)


def run_task(launcher, args: tuple) -> TaskOutcome:
    """The body of one Slurm task of a cell (the tasks_per_node x nodes shape)."""
    signum = preemption_signal()
    requeue = signal.getsignal(signum)  # submitit's checkpoint_and_try_requeue, installed before us
    launch = launch_env.detect()

    def on_idle(received, frame):
        if launch.rank == 0:
            requeue(received, frame)

    arm_preemption(signum, on_idle)
    try:
        job_return = run_hydra_job(launcher, args, writes_cell=launch.rank == 0)
    except SystemExit:
        if preemption.preempted():
            requeue_or_leave(launch.rank, requeue)
        raise
    return task_outcome(job_return, launch)
