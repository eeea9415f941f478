"""The other shape of a multi-rank cell: one Slurm task per node, which starts torchrun.

``hydra/launcher=slurm_torchrun`` (``nproc_per_node: N``, ``tasks_per_node: 1``): the task on
each node writes the cell's job (the launcher and its arguments, as submitit pickled them) to a
file and runs ``torchrun --nnodes <nodes> --node_rank <node> --nproc_per_node N
--master_addr <first node> -m ibridge.slurm.torchrun_cell <file>``; each worker runs the Hydra
job as one rank (ibridge/slurm/cell.py), its rank and world size from torchrun.

Signals: torchrun's agent would die of the preemption signal (USR2), so it is started with that
signal ignored; the workers arm their own handler (``IBRIDGE_PREEMPT_SIGNAL``), and the task
forwards the signal to them too. A worker outside the training loop leaves at once; inside, the
loop saves and stops. Once torchrun has ended, the task on the first node requeues the job.
A failing worker writes its error beside the job file, so that the cell's error names the rank
that failed first, not the ones torchrun stopped after it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ibridge import launch_env, preemption
from ibridge.slurm.cell import (
    RankFailed,
    TaskOutcome,
    arm_preemption,
    preemption_signal,
    requeue_or_leave,
    run_hydra_job,
    task_outcome,
)
from ibridge.slurm.outcome import Failure, root_cause

PREEMPT_ENV = "IBRIDGE_PREEMPT_SIGNAL"


def _files(folder: Path, job_id: str) -> tuple[Path, Path, Path]:
    """The job file, rank 0's outcome and the folder of the workers' errors, beside submitit's."""
    return folder / f"{job_id}_torchrun_job.pkl", folder / f"{job_id}_torchrun_outcome.pkl", \
        folder / f"{job_id}_torchrun_errors"


def first_error(errors: Path) -> str | None:
    """The error of the worker that caused the others' (each file: ``<time>\\t<error>``; outcome.py)."""
    entries = []
    for path in errors.glob("rank*.txt"):
        stamp, _, message = path.read_text().partition("\t")
        rank = int(path.name[4:].split(".")[0])
        entries.append(Failure(rank=rank, error=message.strip(), ended_at=float(stamp)))
    cause = root_cause(entries)
    return cause.error if cause else None


def run_node(launcher, args: tuple) -> TaskOutcome:
    """The body of the one Slurm task on a node: torchrun with `nproc_per_node` workers."""
    import cloudpickle
    import submitit

    env = submitit.JobEnvironment()
    signum = preemption_signal()
    requeue = signal.getsignal(signum)
    nproc = int(launcher.params["nproc_per_node"])
    job_file, outcome_file, errors = _files(env.paths.folder, env.job_id)
    node_job = job_file.with_suffix(f".node{env.node}.pkl")
    if env.node == 0:
        outcome_file.unlink(missing_ok=True)  # an earlier attempt's (a requeued job runs again)
    errors.mkdir(parents=True, exist_ok=True)
    for stale in errors.glob(f"rank*.node{env.node}.txt"):
        stale.unlink()
    node_job.write_bytes(cloudpickle.dumps((launcher, args, outcome_file, errors)))
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "localhost")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={env.num_nodes}",
               f"--node_rank={env.node}", f"--nproc_per_node={nproc}",
               f"--master_addr={launch_env.first_host(nodelist)}",
               f"--master_port={launch_env.rendezvous_port(env.job_id, launch_env.requeue_count())}",
               "-m", "ibridge.slurm.torchrun_cell", str(node_job)]
    child_env = {**os.environ, PREEMPT_ENV: signal.Signals(signum).name}
    proc = subprocess.Popen(command, env=child_env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signum, signal.SIG_IGN))

    def forward(received, frame):
        preemption.note(received)
        with _quiet():
            os.killpg(proc.pid, received)

    preemption.add_preemption_signal(signum)
    signal.signal(signum, forward)
    signal.signal(signal.SIGTERM, forward)  # Slurm's requeue or scancel: the workers save and stop
    code = proc.wait()
    if preemption.preempted():
        requeue_or_leave(env.node, requeue)
    if code != 0:
        raise RankFailed(first_error(errors) or f"torchrun on node {env.node} exited with {code} "
                         f"(its output: {env.paths.stderr})")
    if env.node != 0:
        return TaskOutcome(rank=env.node * nproc, world_size=env.num_nodes * nproc, job_return=None, error=None,
                           ended_at=time.time())
    return cloudpickle.loads(outcome_file.read_bytes())


class _quiet:
    """Ignore a process (group) that has already gone."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        return kind is not None and issubclass(kind, ProcessLookupError)


def worker(node_job: Path) -> None:
    """One torchrun worker: one rank of the cell's job."""
    import cloudpickle

    launcher, args, outcome_file, errors = cloudpickle.loads(Path(node_job).read_bytes())
    launch = launch_env.detect()
    signum = signal.Signals[os.environ.get(PREEMPT_ENV, "SIGUSR2")]

    def leave(received, frame):  # outside the training loop: stop now; the node's task requeues
        raise SystemExit(128 + received)

    arm_preemption(signum, leave)
    node = os.environ.get("GROUP_RANK", "0")
    record = errors / f"rank{launch.rank}.node{node}.txt"
    try:
        outcome = task_outcome(run_hydra_job(launcher, args, writes_cell=launch.rank == 0), launch)
    except Exception as err:
        message = str(err) if isinstance(err, RankFailed) else f"rank {launch.rank}: {type(err).__name__}: {err}"
        record.write_text(f"{time.time()}\t{message}")
        raise
    if outcome.error is not None:  # rank 0's run failed (it wrote the cell's results.json itself)
        record.write_text(f"{outcome.ended_at}\trank 0 of {launch.world_size}: {outcome.error}")
    if launch.rank == 0:
        partial = outcome_file.with_suffix(".partial")
        partial.write_bytes(cloudpickle.dumps(outcome))
        partial.replace(outcome_file)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m ibridge.slurm.torchrun_cell <job file> (started by torchrun)")
    worker(Path(sys.argv[1]))
