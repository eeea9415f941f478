"""Helpers for tests/slurm: whether the one-node test Slurm is up, sweeps through it, its jobs.

The tests run only on the Slurm that tests/slurm/up.sh started (its slurm.conf carries a mark):
they change job time limits and start times with `scontrol`, as root, which a user of a real
cluster may not do, and nobody wants test jobs in a real queue.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ibridge

MARK = "# written by ibridge tests/slurm/up.sh"
# A cell of the sweeps below: 2 ranks (Slurm tasks) on CPUs, no GPU, one core each.
CELL_OF_TWO = ["hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2", "hydra.launcher.gpus_per_node=null",
               "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=null", "hydra.launcher.timeout_min=10",
               "hydra.launcher.signal_delay_s=120", "hydra.launcher.max_num_timeout=3"]
TRAIN = ["train", "debug=smoke", "trainer=ddp", "trainer.num_threads=1"]


def problem() -> str | None:
    """Why tests/slurm cannot run here, or None."""
    if shutil.which("sinfo") is None:
        return "no Slurm here (sinfo not found); `make test-slurm` (root) brings one up with tests/slurm/up.sh"
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    if not (conf.is_file() and MARK in conf.read_text()):
        return f"{conf} was not written by tests/slurm/up.sh: the tests submit only to that one-node test Slurm"
    try:
        states = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo failed: {err}"
    if states.returncode != 0 or not any(s.strip() in ("idle", "mixed", "allocated") for s in states.stdout.split()):
        return f"the test Slurm has no node up (sinfo: {states.stdout.strip() or states.stderr.strip()})"
    return None


def squeue(job_id: str, fmt: str) -> str:
    proc = subprocess.run(["squeue", "--noheader", "--array", f"--jobs={job_id}", f"--format={fmt}"],
                          capture_output=True, text=True, timeout=30)
    return proc.stdout.strip()


def elapsed_s(job_id: str) -> int:
    """How long the job has run (squeue's ``[[d-]h:]m:s``)."""
    text = squeue(job_id, "%M")
    days, _, clock = text.rpartition("-")
    seconds = 0
    for part in clock.split(":"):
        seconds = seconds * 60 + int(part)
    return seconds + 86400 * int(days or 0)


def scontrol(*args: str) -> None:
    subprocess.run(["scontrol", *args], check=True, capture_output=True, text=True, timeout=30)


def start_sweep(args: list[str], cwd: Path, cache: Path, env: dict | None = None) -> subprocess.Popen:
    """`python -m ibridge -m ARGS` in the background (like tests.conftest.ibridge, not waited for)."""
    from tests.conftest import REPO

    full_env = {**os.environ, "IBRIDGE_CACHE": str(cache), "WANDB_MODE": "offline", "PYTHONPATH": str(REPO),
                **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "ibridge", "-m", *args], cwd=cwd, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def sweep(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    return ibridge(["-m", *args], cwd, cache)


def wait_until(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep ended before {what}:\n{proc.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(poll)


def logged_steps(cell: Path) -> list[int]:
    metrics = cell / "metrics.jsonl"
    if not metrics.is_file():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()
            if line.strip().endswith("}") and "train/loss" in line]


def only_job(sweep_dir: Path) -> str:
    """The Slurm id (``<array>_<cell>``) of the one cell of a sweep, from submitit's folders."""
    folders = [p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir() and re.fullmatch(r"\d+(_\d+)?", p.name)]
    assert len(folders) == 1, folders
    return folders[0]


def cancel_jobs(sweep_dir: Path) -> None:
    """scancel what a sweep submitted (a test that failed half-way leaves nothing in the queue)."""
    folder = sweep_dir / ".submitit"
    ids = sorted({p.name.split("_")[0] for p in folder.iterdir() if re.fullmatch(r"\d+(_\d+)?", p.name)}) \
        if folder.is_dir() else []
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


def release_when_requeued(job_id: str, timeout: float = 180, time_limit_min: int | None = None) -> None:
    """Wait for the requeued job to be pending again, then let it start now.

    Slurm holds a requeued job for about two minutes (``BeginTime``) before it may start; a
    real cluster's queue adds its own wait. The tests start it at once (and may give it a
    new time limit): what they test is what the job does when it runs again.
    """
    def pending() -> bool:
        return squeue(job_id, "%T %r").startswith("PENDING")

    wait_until(pending, timeout, f"job {job_id} pending again after its requeue", poll=0.5)
    update = [f"JobId={job_id}", "StartTime=now"]
    if time_limit_min is not None:
        update.append(f"TimeLimit={time_limit_min}")
    scontrol("update", *update)


def results(cell: Path) -> dict:
    return json.loads((cell / "results.json").read_text())


def cell_folders(sweep_dir: Path) -> dict[int, Path]:
    return {int(p.name.split("_", 1)[0]): p for p in sweep_dir.iterdir() if p.name[:1].isdigit() and p.is_dir()}
