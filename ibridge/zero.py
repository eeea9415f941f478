"""DeepSpeed ZeRO as a backend of the training loop (``trainer=deepspeed``).

The loop's maths is unchanged (DESIGN.md §2 objectives, gradients averaged over
ranks); DeepSpeed's engine takes over the three things it must own to shard state:
the backward pass (it reduces and partitions gradients), gradient clipping and the
optimiser step (it holds the AdamW moments, partitioned: ZeRO-1/2; and the weights
too: ZeRO-3). The optimiser (torch AdamW with ibridge's decay groups) and the
learning-rate schedule are ibridge's own, handed to the engine.

Differences from the other backends, all documented in docs/real_setting.md:

* no mid-stage resumable state: DeepSpeed's checkpoints are pickles, which ibridge
  never loads (weights load from safetensors only), so a killed stage restarts;
* the gradient norm is computed inside the engine's step, so a non-finite norm is
  detected just after the update rather than before it (a non-finite loss is still
  caught before);
* with ``trainer.precision=bf16`` the module's weights are bf16 (fp32 master
  copies live in the optimiser), so the saved checkpoint holds bf16-rounded weights.

DeepSpeed is an optional extra (``pip install --no-build-isolation -e .[deepspeed]``);
nothing imports it unless ``trainer=deepspeed`` is chosen.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch

from ibridge.distributed import DistInfo
from ibridge.training import NonFiniteLoss


def require_deepspeed():
    try:
        import deepspeed
    except ImportError as err:  # an optional extra: say how to get it
        raise RuntimeError(
            "trainer=deepspeed needs DeepSpeed: pip install --no-build-isolation -e '.[deepspeed]' "
            "(after torch), or use trainer=fsdp for the same sharding inside PyTorch"
        ) from err
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # one INFO line per step otherwise
    return deepspeed


def engine_config(batch_size: int, grad_accum: int, max_grad_norm: float, precision: str, zero_stage: int) -> dict:
    """DeepSpeed's config, derived from the stage's settings so that nothing is set twice."""
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": max_grad_norm,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,  # ibridge's own torch AdamW
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class ZeroUpdate:
    """Backward and optimiser step through a DeepSpeed engine.

    The loop calls `backward(loss)` once per micro-batch and `update(step_loss)` once
    per optimiser step. DeepSpeed wants `engine.step()` after every micro-batch (it
    applies the update only at the accumulation boundary), so `backward` steps the
    engine on the micro-batches before the last, and `update` on the last.
    """

    def __init__(self, model, optimizer, scheduler, settings, runtime, desc: str):
        deepspeed = require_deepspeed()
        config = engine_config(settings.batch_size, settings.grad_accum, settings.max_grad_norm,
                               runtime.precision, runtime.dist.zero_stage)
        self.module, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=config)
        self.desc = desc

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss)  # scaled by 1 / gradient_accumulation_steps inside
        if not self.module.is_gradient_accumulation_boundary():
            self.module.step()

    def update(self, step_loss: torch.Tensor, where: str) -> tuple[float, float]:
        loss_value = float(step_loss)
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(f"{self.desc}: loss is {loss_value} {where}; the weights were not updated")
        self.module.step()  # clip, AdamW step, schedule step, zero the gradients
        norm = self.module.get_global_grad_norm()
        norm_value = float(norm) if norm is not None else float("nan")
        if not math.isfinite(norm_value):
            raise NonFiniteLoss(f"{self.desc}: gradient norm is {norm_value} {where}; DeepSpeed applied the "
                                f"update, so the stage stops here and restarts from its beginning")
        return loss_value, norm_value


def gathered(model: torch.nn.Module, info: DistInfo):
    """Under ZeRO-3, every parameter gathered whole inside the block (a collective call);
    a no-op otherwise."""
    if info.mode != "deepspeed" or info.zero_stage != 3:
        return contextlib.nullcontext()
    deepspeed = require_deepspeed()
    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
