"""Signals that stop training at a step boundary with a saved state (docs/design.md §4).

SIGTERM always does (README, "Resuming"). In a Slurm cell the launcher adds the signal Slurm
sends before the time limit or at preemption (submitit's ``USR2``, ``#SBATCH --signal``):
inside the training loop it stops the stage the same way (every rank at the same step, the
state saved, ``StopRequested``), and the launcher then requeues the cell, which resumes from
that state in the same folder (ibridge/slurm/cell.py). A process remembers which stop signals
it received, so that the launcher can tell a preemption from a plain SIGTERM.
"""

from __future__ import annotations

import contextlib
import signal
import threading

_preemption_signals: list[int] = []  # added by the Slurm launcher in a cell
_received: list[int] = []  # stop signals this process received, in order


def add_preemption_signal(signum: int) -> None:
    """Treat `signum` as a preemption: the training loop saves and stops on it, as on SIGTERM."""
    if signum not in _preemption_signals:
        _preemption_signals.append(signum)


def note(signum: int) -> None:
    _received.append(signum)


def preempted() -> bool:
    """Whether this process received a preemption signal (not merely SIGTERM)."""
    return any(signum in _preemption_signals for signum in _received)


def stop_signals() -> list[int]:
    return [signal.SIGTERM, *_preemption_signals]


def resume_hint() -> str:
    """How a stopped stage continues: the launcher requeues a preempted cell; else the user reruns."""
    return "the cell is requeued and resumes from here" if preempted() else "run the same command to resume"


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum is not None else "a signal to another rank"


@contextlib.contextmanager
def stop_on_signals():
    """Turn the stop signals into a flag the loop checks between steps (main thread only):
    ``flag["stop"]`` and the ``flag["signal"]`` that set it. The handlers in place before (the
    launcher's) are back once the block ends."""
    flag: dict = {"stop": False, "signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        note(signum)
        flag["stop"] = True
        flag["signal"] = flag["signal"] or signum

    previous = {signum: signal.signal(signum, handler) for signum in stop_signals()}
    try:
        yield flag
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
    if flag["signal"] in _preemption_signals:
        # The loop ended (its last step) before it could stop for a preemption: hand the
        # signal to the handler before ours (the launcher's), which requeues the job now.
        signal.raise_signal(flag["signal"])
