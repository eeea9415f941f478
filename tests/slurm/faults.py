"""Faults a cluster produces on its own, injected into Slurm cells for tests/slurm; not a test module.

A Hydra callback, added to a sweep with ``+hydra.callbacks.fault._target_=tests.slurm.faults.Fault``
and its keys; its ``on_job_start`` runs in every task of every cell, before the job:

* ``fail_rank`` / ``fail_cell``: that rank of that cell (``hydra.job.num``) raises in its third
  training forward (a CUDA error, a bad batch on one GPU);
* ``step_seconds``: every training forward of every cell also sleeps this long (a step of a
  real model), so that a stage outlasts Slurm's signal latency (its time-limit check runs
  every 30 s) whatever the speed of the test machine. It changes no value.
"""

from __future__ import annotations

import os
import time

try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency
    Callback = object


class Fault(Callback):
    def __init__(self, fail_rank: int | None = None, fail_cell: int | None = None, step_seconds: float = 0.0):
        self.fail_rank = fail_rank
        self.fail_cell = fail_cell
        self.step_seconds = float(step_seconds)

    def on_job_start(self, config, **kwargs) -> None:
        from ibridge import stages

        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))  # RANK: under torchrun
        failing = self.fail_rank is not None and rank == int(self.fail_rank) and (
            self.fail_cell is None or int(config.hydra.job.num) == int(self.fail_cell))
        original = stages.demonstration_step
        pause = self.step_seconds

        def demonstration_step(objective, *args, **kwargs):
            compute = original(objective, *args, **kwargs)
            calls = {"n": 0}

            def wrapped(model, batch):
                calls["n"] += 1
                if failing and calls["n"] == 3:
                    raise RuntimeError(f"injected failure on rank {rank}")
                if pause:
                    time.sleep(pause)
                return compute(model, batch)

            return wrapped

        stages.demonstration_step = demonstration_step
