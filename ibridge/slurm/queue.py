"""Waiting for a sweep's Slurm jobs without ``sacct``.

submitit learns that a job ended without a result (killed, cancelled, out of memory) from
``sacct``; on a cluster without accounting every call fails with a warning, repeated for as long
as the sweep runs, and such a job is waited for forever. Here a job is done when each of its
tasks has written its result file, or once ``squeue`` (which needs no accounting) says it ended,
or no longer knows it (Slurm forgets ended jobs after ``MinJobAge``), and a grace period for
result files on a slow shared filesystem has passed. A requeued job (``REQUEUED``, ``PENDING``
again) is still running.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "REVOKED", "SPECIAL_EXIT", "TIMEOUT"}
GONE = "GONE"  # no longer in squeue: ended at least MinJobAge ago


def parse_squeue(text: str) -> dict[str, str]:
    """``<job id>|<state>`` lines (``squeue --array --format=%i|%T``) -> {job id: state}."""
    states = {}
    for line in text.splitlines():
        job_id, sep, state = line.strip().partition("|")
        if sep and job_id:
            states[job_id] = state.split()[0] if state.split() else ""
    return states


def queue_states(job_ids: list[str]) -> dict[str, str] | None:
    """squeue's state of each job (array elements one per line); GONE for those it no longer
    knows; None when squeue itself failed (the controller is busy: ask again later)."""
    arrays = sorted({job_id.split("_")[0] for job_id in job_ids})
    command = ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T", f"--jobs={','.join(arrays)}"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.debug("squeue failed: %s", err)
        return None
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        log.debug("squeue failed: %s", proc.stderr.strip())
        return None
    states = parse_squeue(proc.stdout)
    return {job_id: states.get(job_id, GONE) for job_id in job_ids}


def ended(state: str | None) -> bool:
    return state == GONE or (state or "").upper() in ENDED


def wait_for_jobs(jobs: list, result_files: Callable[[object], list[Path]], on_done: Callable[[int, str | None], None],
                  poll_s: float = 5.0, grace_s: float = 30.0, states: Callable = queue_states,
                  clock: Callable[[], float] = time.monotonic) -> None:
    """Call ``on_done(index, last state)`` for each job of `jobs` as it ends, in the order they end."""
    pending = dict(enumerate(jobs))
    seen_ended: dict[int, float] = {}
    last_state: dict[int, str | None] = {}
    while pending:
        current = states([job.job_id for job in pending.values()]) or {}
        now = clock()
        for index, job in list(pending.items()):
            state = current.get(job.job_id, last_state.get(index))
            last_state[index] = state
            if all(path.is_file() for path in result_files(job)):
                done = True
            elif ended(state):
                seen_ended.setdefault(index, now)
                done = now - seen_ended[index] >= grace_s
            else:
                seen_ended.pop(index, None)  # requeued: running again
                done = False
            if done:
                del pending[index]
                on_done(index, state)
        if pending:
            time.sleep(poll_s)
