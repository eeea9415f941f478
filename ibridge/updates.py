"""Backward passes and the optimiser step in plain PyTorch (one process, DDP or FSDP).

The loop (`ibridge.training`) calls, for each optimiser step, ``accumulating(last)``
around each micro-batch's forward and backward, ``backward(loss)`` once per micro-batch
with the loss already weighted for the whole step (`ibridge.batching`), and
``update(step_loss)`` once. `ibridge.zero.ZeroUpdate` is the same interface through
DeepSpeed's engine.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ibridge.distributed import full_tensor


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm became NaN or inf; the message names the step."""


class TorchUpdate:
    def __init__(self, model, trained, optimizer, scheduler, max_grad_norm: float, desc: str):
        self.model, self.trained = model, trained  # `trained`: the module the forward runs (DDP or the model)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.max_grad_norm, self.desc = max_grad_norm, desc

    def accumulating(self, last: bool):
        """Around a micro-batch's forward and backward. Under DDP, gradients are
        all-reduced only on the step's last micro-batch (``no_sync`` on the others): the
        sum is the same, with one reduction per step instead of one per micro-batch.
        FSDP keeps reducing (reduce-scatter) every micro-batch: skipping it would hold
        unsharded gradients, which is the memory FSDP exists to save."""
        if not last and isinstance(self.trained, torch.nn.parallel.DistributedDataParallel):
            return self.trained.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def update(self, step_loss: torch.Tensor, where: str) -> tuple[float, float]:
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm))
        # One host sync per step: the loss and the gradient norm must be finite
        # before the update touches the weights.
        loss_value, norm_value = torch.stack([step_loss.float(), grad_norm.detach().float()]).tolist()
        check_finite(self.desc, loss_value, norm_value, where, "the weights were not updated and the last "
                     "saved state is kept")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value


def check_finite(desc: str, loss_value: float, norm_value: float, where: str, consequence: str) -> None:
    if not math.isfinite(loss_value):
        raise NonFiniteLoss(f"{desc}: loss is {loss_value} {where}; {consequence}")
    if not math.isfinite(norm_value):
        raise NonFiniteLoss(f"{desc}: gradient norm is {norm_value} {where}; {consequence}")
