"""Ctrl-C and SIGTERM end a run with one line and a hint, not a traceback (docs/design.md §3).

A stage saves a resumable state every ``sft.save_every`` / ``dpo.save_every`` steps, and
SIGTERM makes it save at the next logging step before it stops (ibridge/training.py). Either
way the command that was interrupted resumes the run: these helpers say from where. The
traceback still goes to the run's ``error.log`` (and to the terminal with ``HYDRA_FULL_ERROR=1``).
"""

from __future__ import annotations

import json
import signal
import sys
import traceback
from pathlib import Path

from ibridge.checkpointing import STATE_FILE

# Exit codes a shell gives a process killed by the signal: 128 + its number.
EXIT_CTRL_C = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM
STAGES = ("sft", "dpo")


def saved_progress(run_dir: Path) -> str:
    """What a rerun will start from: ``sft finished; dpo resumes from step 40``, or
    ``nothing saved yet`` when no stage finished or saved a state."""
    run_dir = Path(run_dir)
    parts = []
    for stage in STAGES:
        folder = run_dir / stage
        if (folder / "stage.json").is_file():
            parts.append(f"{stage} finished")
            continue
        state = folder / "state" / STATE_FILE
        if state.is_file():
            try:
                step = json.loads(state.read_text()).get("step")
            except (OSError, json.JSONDecodeError):
                step = None
            parts.append(f"{stage} resumes from step {step}" if step is not None else f"{stage} resumes")
    return "; ".join(parts) or "nothing saved yet"


def interrupted_line(run_dir: Path, what: str) -> str:
    """The one line printed when `what` (``interrupted (Ctrl-C)``, a stop message) ended a run."""
    return (f"ibridge: {what}; run the same command to resume ({saved_progress(run_dir)}); "
            f"details in {Path(run_dir) / 'error.log'}")


def stop_run(run_dir: Path, results: dict | None, write_results, main_process: bool, what: str,
             exit_code: int) -> None:
    """End a run that was interrupted: its traceback to ``error.log`` and `results` (unless
    already written) to results.json on rank 0, the one line on the terminal, and the exit
    code. A sweep stops with it (SystemExit is not an Exception Hydra's launchers catch)."""
    if main_process:
        if results is not None:
            (Path(run_dir) / "error.log").write_text(traceback.format_exc())
            write_results(results)
        print(interrupted_line(run_dir, what), file=sys.stderr)
    raise SystemExit(exit_code) from None
