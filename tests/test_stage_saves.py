"""When a stage writes its resumable state (issue 20, item 14): at once on SIGTERM, every
``save_every`` steps exactly, every ``save_every_min`` minutes; and a state written between two
logging steps resumes to the metrics and weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

import ibridge.save_schedule as save_schedule
import ibridge.training as training
from ibridge.runtime import Runtime
from ibridge.training import OptimSettings, StopRequested, optimise
from tests.weighting_case import examples, parts, tiny_model

CPU = Runtime(device=torch.device("cpu"), precision="fp32")
STEPS, LOG_EVERY = 12, 5  # 7 examples, micro-batches of 2: one collated micro-batch (one count) per step


def run(state_dir=None, on_count=None, **settings):
    """`optimise` over the tiny SFT case; `on_count(n)` runs as the n-th micro-batch is counted,
    which is before its step's collective. Returns (model, logged {step: metrics})."""
    _, compute, collate, count = parts("sft")
    calls = {"n": 0}

    def counting(batch):
        calls["n"] += 1
        if on_count is not None:
            on_count(calls["n"])
        return count(batch)

    options = {"lr": 1e-2, "max_steps": STEPS, "batch_size": 2, "log_every": LOG_EVERY, "max_grad_norm": 1e9,
               "pack_sequences": False, **settings}
    logged: dict[int, dict] = {}
    model = tiny_model()
    optimise(model, examples("sft"), collate, compute, OptimSettings(**options), CPU,
             log=lambda metrics, step: logged.setdefault(step, {}).update(metrics), state_dir=state_dir,
             count_units=counting)
    return model, logged


def test_sigterm_saves_after_the_step_in_progress_and_resumes_to_the_same_run(tmp_path):
    """SIGTERM while step 7 is being prepared: the state is that of step 6, written before any
    more training, not at the next logging step (10), which at 8B could be minutes away. The
    metrics of steps 6 (saved) and 7-10 (after the resume) make up one logged mean at step 10,
    as in an uninterrupted run, and the weights end the same."""
    straight, straight_logged = run()
    state = tmp_path / "state"

    def sigterm_at_step_7(n):
        if n == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(StopRequested, match="after step 6"):
        run(state, on_count=sigterm_at_step_7)
    payload = json.loads((state / "trainer_state.json").read_text())
    assert payload["step"] == 6
    assert payload["window"]["train/loss"][1] == 1.0  # step 6's loss: one step since the log at 5
    resumed, resumed_logged = run(state)
    assert sorted(resumed_logged) == [10, 12]
    for step in (10, 12):
        for key, value in straight_logged[step].items():
            if key != "train/tokens_per_s":
                assert resumed_logged[step][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_states_come_every_save_every_steps_and_every_save_every_min_minutes(tmp_path, monkeypatch):
    """``save_every=3`` saves at steps 3, 6, 9 (not rounded up to the logging steps 5, 10), and
    ``save_every_min=5`` with a clock that advances one minute per step saves once 5 minutes
    have passed since the last state: at the top of step 5 the state of step 4, then 5 minutes
    after that one."""
    saved: list[int] = []
    original = training.save_state
    monkeypatch.setattr(training, "save_state", lambda *args, **kwargs: (saved.append(args[4]), original(*args, **kwargs)))
    run(tmp_path / "steps", save_every=3)
    assert saved == [3, 6, 9]

    saved.clear()
    clock = {"t": 0.0}
    monkeypatch.setattr(save_schedule.time, "monotonic", lambda: clock["t"])

    def one_minute_per_step(n):
        clock["t"] += 60.0

    run(tmp_path / "minutes", on_count=one_minute_per_step, save_every_min=5)
    assert saved == [4, 9]
