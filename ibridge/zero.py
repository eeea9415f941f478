"""DeepSpeed ZeRO as a backend of the training loop (``trainer=deepspeed``).

The loop's maths is unchanged (docs/design.md §1 objectives, gradients averaged over
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
* under ``trainer.precision=fp16`` DeepSpeed's dynamic loss scaler skips the update of a
  step whose scaled gradients overflowed and halves the scale (routine in the first steps
  from its 2**16 initial scale): ``was_step_applied()`` says so, the step is logged
  (``train/skipped_steps``, a warning) and training goes on; only a non-finite norm of an
  applied step stops the stage;
* with ``trainer.precision=bf16`` the module's weights are bf16 (fp32 master
  copies live in the optimiser), so the saved checkpoint holds bf16-rounded weights; under
  every ZeRO stage (`engine_weights_dtype`: the stage loads them so, ZeRO-3 partitions them so).

DeepSpeed is an optional extra (``pip install --no-build-isolation -e .[deepspeed]``);
nothing imports it unless ``trainer=deepspeed`` is chosen.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from ibridge.distributed import require_deepspeed
from ibridge.updates import check_finite

log = logging.getLogger(__name__)


def engine_weights_dtype(precision: str) -> torch.dtype:
    """The dtype DeepSpeed's engine keeps the module's weights in: bf16 or fp16 under those
    precisions (fp32 master copies in the optimiser), fp32 otherwise. The reference pass runs on
    the same weights (`ibridge.models.reference_pass_dtype`), so that the implicit reward of the
    untrained policy is zero."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def engine_config(batch_size: int, grad_accum: int, max_grad_norm: float, precision: str, zero_stage: int) -> dict:
    """DeepSpeed's config, derived from the stage's settings so that nothing is set twice.

    Gradients are reduced across ranks and accumulated across micro-batches in fp32 even
    when the forward runs in bf16 (``communication_data_type``, ``data_types.grad_accum_dtype``):
    bf16's 8-bit mantissa would round away small per-micro-batch contributions, which the
    other backends (autocast over fp32 weights, FSDP's fp32 ``reduce_dtype``) keep.
    """
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": max_grad_norm,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "communication_data_type": "fp32",
        "data_types": {"grad_accum_dtype": "fp32"},
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,  # ibridge's own torch AdamW
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class ZeroUpdate:
    """Backward passes and the optimiser step through a DeepSpeed engine.

    The loop weights each micro-batch's loss for the whole step itself (ibridge/batching.py),
    and an epoch's last step may have fewer micro-batches than ``grad_accum``, so the
    engine's own accumulation counting is overridden: ``backward(..., scale_wrt_gas=False)``
    and the accumulation boundary set explicitly on each micro-batch (`accumulating`).
    """

    def __init__(self, model, optimizer, scheduler, settings, runtime, desc: str):
        deepspeed = require_deepspeed()
        config = engine_config(settings.batch_size, settings.grad_accum, settings.max_grad_norm,
                               runtime.precision, runtime.dist.zero_stage)
        if runtime.dist.zero_stage == 3:
            # zero.Init(module=...) partitions the weights in the dtype they have, and initialize()
            # then assumes they are in the engine's (it casts them only under ZeRO-1/2): fp32
            # partitions would train and be saved in fp32, off the bf16 reference pass.
            dtype = engine_weights_dtype(runtime.precision)
            for param in model.parameters():  # weights only: fp32 buffers (rotary) stay, as DeepSpeed keeps them
                if param.is_floating_point() and param.dtype != dtype:
                    param.data = param.data.to(dtype)
            # Partition the (CPU-loaded) weights parameter by parameter, as if the model had
            # been built inside zero.Init: otherwise initialize() first moves the whole model
            # to this rank's GPU, 32 GB of fp32 weights for an 8B model on every GPU.
            deepspeed.zero.Init(module=model, config_dict_or_path=config)
        self.module, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=config)
        self.trained = self.module
        self.desc = desc
        self._last = True
        self.skipped_steps = 0  # fp16 steps whose update the loss scaler skipped (logged as train/skipped_steps)

    def accumulating(self, last: bool):
        self.module.set_gradient_accumulation_boundary(last)
        self._last = last
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss, scale_wrt_gas=False)
        if not self._last:
            self.module.step()  # not a boundary: DeepSpeed only accumulates

    def update(self, step_loss: torch.Tensor, where: str) -> tuple[float, float | None]:
        """The step's loss and gradient norm; the norm is None for a step DeepSpeed's fp16 loss
        scaler skipped (gradients overflowed: no update, no schedule step, a halved scale)."""
        loss_value = float(step_loss)
        check_finite(self.desc, loss_value, 0.0, where, "the weights were not updated")
        self.module.step()  # clip, AdamW step, schedule step, zero the gradients
        if not self.module.was_step_applied():
            self.skipped_steps += 1
            log.warning("%s: the update %s was skipped by DeepSpeed's fp16 loss scaler (the scaled gradients "
                        "overflowed; it lowers the scale and goes on); %d skipped so far",
                        self.desc, where, self.skipped_steps)
            return loss_value, None
        norm = self.module.get_global_grad_norm()
        norm_value = float(norm) if norm is not None else float("nan")
        check_finite(self.desc, loss_value, norm_value, where,
                     "DeepSpeed applied the update, so the stage stops here and restarts from its beginning")
        return loss_value, norm_value

    def counters(self) -> dict[str, float]:
        """Logged with the step's metrics."""
        return {"train/skipped_steps": float(self.skipped_steps)}

    def close(self) -> None:
        """Tear the engine down (its hooks, its optimiser's buffers), so that its memory can go
        once the model is dropped: the engine and a ZeRO optimiser hold reference cycles."""
        self.module.destroy()
