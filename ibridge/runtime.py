"""Device, precision and seeding: what the trainer and the evaluator share."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from ibridge.distributed import DistInfo, init_distributed


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # "fp32" | "bf16" | "fp16"
    attn_implementation: str = "eager"
    trust_remote_code: bool = False  # off unless model.trust_remote_code=true
    lora: bool = False  # model.lora.enabled: stages train adapters over a frozen base
    dist: DistInfo = DistInfo()
    tf32: bool = True  # trainer.tf32: TF32 matmuls in fp32 scoring passes on GPUs (ibridge/scoring.py)

    def autocast(self):
        """Mixed precision on accelerators; a no-op in fp32.

        Weights stay fp32 (the optimiser's master copy); only the forward runs in
        low precision. On a CPU without bf16 units autocast is about ten times
        slower than fp32 (docs/design.md §3), so `precision=auto` never picks it there.
        """
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def resolve_runtime(trainer_cfg, model_cfg=None) -> Runtime:
    dist = init_distributed(trainer_cfg)
    requested = trainer_cfg.get("device", "auto")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and dist.enabled:
        requested = f"cuda:{dist.device_index}"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.device={requested}: no CUDA device is available")
    device = torch.device(requested)
    precision = trainer_cfg.get("precision", "auto")
    if precision == "auto":
        # Native bf16 only: GPUs before Ampere emulate it, far slower than fp32.
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"trainer.precision={precision!r}: expected auto, fp32, bf16 or fp16")
    if precision == "fp16" and dist.mode != "deepspeed":
        from ibridge.config import ConfigError

        # trainer=deepspeed launched as one process runs ibridge's own loop (DistInfo() above), which
        # has no loss scaler: fp16 gradients would underflow silently.
        raise ConfigError("trainer.precision=fp16 needs DeepSpeed's loss scaler, which runs only under torchrun "
                          "with 2 or more processes; in one process use trainer.precision=bf16 (or fp32)")
    attn = trainer_cfg.get("attn_implementation", "auto")
    if attn == "auto":
        attn = auto_attention(device, precision)
    elif precision == "fp32" and "flash" in str(attn):
        from ibridge.config import ConfigError

        # Training on fp32 weights without autocast would hand flash fp32 inputs, which it refuses.
        raise ConfigError(f"trainer.attn_implementation={attn} runs in fp16/bf16 only, but trainer.precision "
                         "is fp32 here: use trainer.attn_implementation=sdpa (or auto)")
    threads = int(trainer_cfg.get("num_threads", 0) or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    trust = bool((model_cfg or {}).get("trust_remote_code", False))
    lora = bool(((model_cfg or {}).get("lora") or {}).get("enabled", False))
    return Runtime(device=device, precision=precision, attn_implementation=attn, trust_remote_code=trust, lora=lora,
                   dist=dist, tf32=bool(trainer_cfg.get("tf32", True)))


def auto_attention(device: torch.device, precision: str) -> str:
    """The attention implementation ``trainer.attn_implementation=auto`` picks.

    * GPU, bf16/fp16: ``flash_attention_2`` when the flash-attn package is installed: its
      variable-length kernels take packed sequences without any mask (ibridge/packing.py);
      else ``sdpa``, which packs through a block-diagonal boolean mask. fp32: ``sdpa``
      (flash kernels are half-precision only).
    * CPU: ``eager``. On the toy model (sequences of up to 48 tokens) eager and sdpa steps
      are within noise of each other since packing covers sdpa (40 SFT steps: 1.1-1.5 s
      vs 1.5-1.8 s), and the toy base is pretrained with eager attention, so eager keeps
      the cached base reproducible. For long sequences on CPU, sdpa is faster and lighter
      (BENCHMARKS.md, bench-scale: eager keeps each row's attention probabilities, heads x
      L x L floats, for the backward pass): set ``trainer.attn_implementation=sdpa``.
    """
    if device.type != "cuda":
        return "eager"
    if precision in ("bf16", "fp16"):
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            return "flash_attention_2"
    return "sdpa"


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (all devices) from one seed."""
    from transformers import set_seed

    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    set_seed(seed)
