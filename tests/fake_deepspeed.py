"""DeepSpeed's engine as its documentation describes it, for tests; not a test module.

DeepSpeed's CPU accelerator has no fp16, so its fp16 loss scaler cannot run here. `FakeEngine`
implements the part of the engine's documented API that ibridge calls (``deepspeed.initialize``,
``backward``, ``step``, ``set_gradient_accumulation_boundary``, ``was_step_applied``,
``get_global_grad_norm``, ``destroy``) with the semantics of a ZeRO-1/2 engine over a torch
optimiser: gradients accumulate until a boundary; at a boundary ``step()`` clips, steps the
optimiser and the schedule and zeroes the gradients, unless the fp16 loss scaler finds the
scaled gradients overflowed (the optimiser steps listed in `overflow_steps`), in which case it
zeroes them, applies nothing, leaves the schedule where it is, reports an infinite gradient
norm (DeepSpeed's ZeRO optimiser sets ``_global_grad_norm = inf``) and ``was_step_applied()``
is False.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch


class FakeEngine:
    made: list[FakeEngine] = []

    def __init__(self, model, optimizer, lr_scheduler, config: dict, overflow_steps=()):
        self.module, self.optimizer, self.lr_scheduler, self.config = model, optimizer, lr_scheduler, config
        self.overflow_steps = set(overflow_steps)
        self.boundary, self.boundary_steps, self.skipped_steps = True, 0, 0
        self._applied, self._norm, self.destroyed = False, None, False
        FakeEngine.made.append(self)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        self.boundary = is_boundary

    def backward(self, loss, scale_wrt_gas: bool = True) -> None:
        loss.backward()

    def step(self) -> None:
        if not self.boundary:
            self._applied = False
            return
        self.boundary_steps += 1
        if self.boundary_steps in self.overflow_steps:
            self.optimizer.zero_grad(set_to_none=True)
            self._applied, self._norm = False, float("inf")
            self.skipped_steps += 1
            return
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.config["gradient_clipping"])
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._applied, self._norm = True, float(norm)

    def was_step_applied(self) -> bool:
        return self._applied

    def get_global_grad_norm(self):
        return self._norm

    def destroy(self) -> None:
        self.destroyed = True


def install(monkeypatch, overflow_steps=()) -> None:
    """ibridge's `require_deepspeed()` returns a module whose ``initialize`` builds a FakeEngine."""
    import ibridge.zero as zero

    FakeEngine.made = []

    def initialize(model, optimizer, lr_scheduler, config):
        engine = FakeEngine(model, optimizer, lr_scheduler, config, overflow_steps)
        return engine, optimizer, None, lr_scheduler

    fake = SimpleNamespace(initialize=initialize, zero=SimpleNamespace(Init=lambda **kwargs: contextlib.nullcontext()))
    monkeypatch.setattr(zero, "require_deepspeed", lambda: fake)
