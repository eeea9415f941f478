"""A cell's status from what each of its Slurm tasks left behind (the submitting side).

Each task ends with a submitit result file: ``("success", TaskOutcome)``, ``("error",
traceback)`` (a rank that raised: ``RankFailed`` for a rank other than 0), or none at all (a
task killed by Slurm, by ``--kill-on-bad-exit`` after another task failed, or by the OOM
killer). A cell is completed only if every task succeeded and rank 0's run completed;
otherwise its results.json is rewritten as failed, naming the rank that failed first: when one
rank fails, the others fail after it with errors of their own (a closed connection in a
collective, SIGTERM from srun), which say nothing about the cause.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ibridge.io import write_json_atomic

# Errors a rank gets because another rank failed or the step was ended: never the cause when
# another rank has an error of its own.
SECONDARY = re.compile(
    r"connection (closed|reset) by peer|broken pipe|DistBackendError|DistNetworkError|ProcessGroup\w*|"
    r"NCCL communicator was aborted|stopped by SIG|StopRequested|ended without a result|SIGTERM|SIGKILL|"
    r"Socket Timeout|recv.*(failed|error)|gloo", re.IGNORECASE)


@dataclass(frozen=True)
class Failure:
    rank: int
    error: str
    ended_at: float | None = None  # None: unknown (no result file)


def root_cause(failures: list[Failure]) -> Failure | None:
    """The failure that caused the others: the earliest of those that do not look like a
    consequence of another rank's failure (or the earliest of all, if all do)."""
    if not failures:
        return None
    primary = [f for f in failures if not SECONDARY.search(f.error)] or failures
    return min(primary, key=lambda f: (math.inf if f.ended_at is None else f.ended_at, f.rank))


def last_line(traceback_text: str) -> str:
    """``RankFailed: rank 1 of 2: ...`` from a traceback's last line (module path dropped)."""
    lines = [line for line in str(traceback_text).strip().splitlines() if line.strip()]
    if not lines:
        return "failed without a message"
    line = lines[-1].strip()
    head, sep, rest = line.partition(": ")
    if sep and re.fullmatch(r"[\w.]+", head):
        name = head.rsplit(".", 1)[-1]
        return rest if name == "RankFailed" else f"{name}: {rest}"
    return line


@dataclass
class TaskResult:
    """What the submitting side knows of one task: its outcome, or its error, or nothing."""

    task: int
    outcome: object | None = None  # ibridge.slurm.cell.TaskOutcome
    error: str | None = None
    ended_at: float | None = None


def read_task(task: int, result_pickle: Path) -> TaskResult:
    """One task's result file (submitit's), if it wrote one."""
    from submitit.core.utils import pickle_load

    if not result_pickle.is_file():
        return TaskResult(task)
    kind, value = pickle_load(result_pickle)
    ended = result_pickle.stat().st_mtime
    if kind == "success":
        return TaskResult(task, outcome=value, error=getattr(value, "error", None), ended_at=ended)
    return TaskResult(task, error=last_line(value), ended_at=ended)


def cell_failure(tasks: list[TaskResult], job_id: str, state: str | None, stderr: Path) -> str | None:
    """None when every task succeeded; else the cell's one-line error (the first failure's)."""
    failures = [Failure(t.task, _with_rank(t), t.ended_at) for t in tasks if t.error is not None]
    missing = [t.task for t in tasks if t.outcome is None and t.error is None]
    if not failures and not missing:
        return None
    where = f"Slurm job {job_id}" + (f", {state}" if state else "")
    cause = root_cause(failures)
    if cause is None:
        return (f"{len(missing)} of {len(tasks)} tasks ended without a result ({where}; killed, out of memory "
                f"or cancelled?); see {stderr}")
    return f"{cause.error} ({where})"


def _with_rank(task: TaskResult) -> str:
    error = str(task.error)
    return error if error.startswith("rank ") else f"rank {task.task}: {error}"


def record_failure(cell_dir: Path, error: str, extra: dict) -> dict:
    """Mark the cell failed in its results.json (written whole; what rank 0 wrote is kept)."""
    path = Path(cell_dir) / "results.json"
    results: dict = {}
    if path.is_file():
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            results = {}
    if results.get("status") == "failed" and results.get("error") and results["error"] not in error:
        extra = {**extra, "rank0_error": results["error"]}
    results.update({"status": "failed", "error": error, "run_dir": str(cell_dir), **extra})
    Path(cell_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, results)
    return results
