"""The numerics of scoring passes: which attention kernel, which weights, TF32 or not.

ibridge scores sequences outside training in float32 whatever the training precision
(evaluation's `kl_to_ref` and `implicit_reward_acc`, `ibridge qlogit`; docs/design.md §1, §3),
and `kl/token` in the precision the policy's forward runs in. Two things follow on GPUs:

* **Attention.** Flash-attention kernels take fp16/bf16 only ("FlashAttention only support
  fp16 and bf16 data type"); transformers casts fp32 queries to the autocast dtype, or to the
  dtype of the model's linear weights, which for an fp32 model is fp32 again. So a pass on
  fp32 weights without autocast runs with ``sdpa`` instead (:func:`scoring_attention`): models
  loaded for such a pass come with it (:func:`load_scoring_model`), and a live model (the
  policy during `kl/token`) is switched to it for the pass and back
  (:func:`attention_implementation`). sdpa and flash compute the same function; only rounding
  differs.
* **TF32.** fp32 matmuls on Ampere and later GPUs run ~8x faster in TF32 (inputs rounded to
  a 10-bit mantissa, fp32 accumulation). ``trainer.tf32`` (default true) turns it on inside
  fp32 scoring passes on GPUs only (:func:`fp32_matmuls`): a relative rounding of about 5e-4
  per matmul input, 8 times finer than bf16's, not the exact fp32 of a CPU. Training and the
  reference pass never run under it.
"""

from __future__ import annotations

import contextlib

import torch

from ibridge.models import load_model, trains_on_bf16_weights
from ibridge.runtime import Runtime

# The attention implementation fp32 passes fall back to: exact attention in any dtype, and
# packable (ibridge/packing.py).
FP32_ATTENTION = "sdpa"
# Substrings that name an attention implementation running in fp16/bf16 only: the flash family
# (``flash_attention_2``, ``flash_attention_3``, paged variants, hub kernels such as
# ``kernels-community/flash-attn2``), as transformers itself recognises it.
HALF_PRECISION_ATTENTION = ("flash",)


def half_precision_only(attn_implementation: str | None) -> bool:
    """Whether an attention implementation runs in fp16/bf16 only (`HALF_PRECISION_ATTENTION`)."""
    return any(marker in str(attn_implementation or "") for marker in HALF_PRECISION_ATTENTION)


def scoring_attention(runtime: Runtime, dtype: torch.dtype) -> str:
    """The attention implementation for a pass on `dtype` weights without autocast: the run's
    own, unless that is half-precision only and the pass is float32."""
    if dtype == torch.float32 and half_precision_only(runtime.attn_implementation):
        return FP32_ATTENTION
    return runtime.attn_implementation


def load_scoring_model(path, runtime: Runtime, dtype: torch.dtype = torch.float32):
    """A model for a scoring pass: `dtype` weights (float32 by default), eval mode, no gradients,
    with the attention implementation that runs in that dtype (:func:`scoring_attention`)."""
    return load_model(path, runtime, for_inference=True, dtype=dtype,
                      attn_implementation=scoring_attention(runtime, dtype))


def scores_in_fp32(model, runtime: Runtime) -> bool:
    """Whether `model` can run a float32 scoring pass as it is: float32 weights and the attention
    implementation :func:`scoring_attention` picks for them (else: `load_scoring_model`)."""
    config = getattr(_transformers_model(model), "config", None)
    return (next(model.parameters()).dtype == torch.float32
            and getattr(config, "_attn_implementation", None) == scoring_attention(runtime, torch.float32))


def policy_forward_dtype(runtime: Runtime) -> torch.dtype:
    """The dtype the policy's forward runs in outside autocast (the `kl/token` pass): bf16 where
    training runs on bf16 weights (FSDP's bf16 parameter policy, DeepSpeed bf16, a LoRA stage's
    bf16 base; `ibridge.models.trains_on_bf16_weights`), fp16 under DeepSpeed fp16 (the engine
    casts the module), float32 otherwise (autocast over fp32 weights)."""
    if trains_on_bf16_weights(runtime):
        return torch.bfloat16
    if runtime.dist.mode == "deepspeed" and runtime.precision == "fp16":
        return torch.float16
    return torch.float32


def _transformers_model(model):
    base = getattr(model, "module", model)  # DDP, DeepSpeed
    return base.get_base_model() if hasattr(base, "get_base_model") else base  # peft


@contextlib.contextmanager
def attention_implementation(model, attn_implementation: str):
    """`model` (a transformers model, or DDP / FSDP / peft around one) runs with
    `attn_implementation` inside the block and with its own afterwards."""
    base = _transformers_model(model)
    config = getattr(base, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if config is None or previous == attn_implementation:
        yield model
        return
    _set_attention(base, attn_implementation)
    try:
        yield model
    finally:
        _set_attention(base, previous)


def _set_attention(model, attn_implementation: str) -> None:
    if hasattr(model, "set_attn_implementation"):  # transformers >= 4.56: checks and sets every sub-model
        model.set_attn_implementation(attn_implementation)
    else:
        model.config._attn_implementation = attn_implementation


@contextlib.contextmanager
def fp32_matmuls(runtime: Runtime):
    """float32 matmuls in TF32 inside the block on a GPU when ``runtime.tf32`` (``trainer.tf32``);
    nothing changes on a CPU. The previous setting is restored afterwards, so training and the
    reference pass (whose cache key records it) never see it."""
    if runtime.device.type != "cuda" or not runtime.tf32:
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
