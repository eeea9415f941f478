"""Stop signals of the training loop (ibridge/preemption.py): SIGTERM, and a Slurm cell's USR2."""

from __future__ import annotations

import os
import signal

import pytest

from ibridge import preemption


@pytest.fixture
def fresh(monkeypatch):
    """Module state and the USR2 handler as they were."""
    monkeypatch.setattr(preemption, "_preemption_signals", [])
    monkeypatch.setattr(preemption, "_received", [])
    previous = signal.getsignal(signal.SIGUSR2)
    yield
    signal.signal(signal.SIGUSR2, previous)


def test_sigterm_stops_the_loop_and_is_not_a_preemption(fresh):
    with preemption.stop_on_signals() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
    assert flag == {"stop": True, "signal": signal.SIGTERM}
    assert not preemption.preempted() and preemption.resume_hint() == "run the same command to resume"


def test_the_cells_preemption_signal_stops_the_loop_and_marks_a_preemption(fresh):
    outer = []
    signal.signal(signal.SIGUSR2, lambda s, f: outer.append(s))  # the launcher's handler
    preemption.add_preemption_signal(signal.SIGUSR2)
    with pytest.raises(RuntimeError, match="stopped"):
        with preemption.stop_on_signals() as flag:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert flag["stop"] and flag["signal"] == signal.SIGUSR2
            raise RuntimeError("stopped")  # the loop raises StopRequested: the signal is dealt with
    assert outer == [] and preemption.preempted()
    assert preemption.resume_hint() == "the cell is requeued and resumes from here"
    assert signal.getsignal(signal.SIGUSR2) is not None and callable(signal.getsignal(signal.SIGUSR2))


def test_a_preemption_the_loop_could_not_stop_for_goes_on_to_the_launchers_handler(fresh):
    """The signal came during the last steps: the stage ended normally, so the launcher's
    handler gets the signal (and requeues) once the loop's handler is gone."""
    outer = []
    signal.signal(signal.SIGUSR2, lambda s, f: outer.append(s))
    preemption.add_preemption_signal(signal.SIGUSR2)
    with preemption.stop_on_signals():
        os.kill(os.getpid(), signal.SIGUSR2)
        assert outer == []
    assert outer == [signal.SIGUSR2]


def test_without_a_launcher_usr2_is_not_a_stop_signal(fresh):
    assert preemption.stop_signals() == [signal.SIGTERM]
