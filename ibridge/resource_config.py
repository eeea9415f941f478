"""Settings that size a run to its GPUs: gradient checkpointing, state cadence, generation budget.

Their defaults are chosen so that the documented commands fit their GPUs (docs/memory.md,
docs/real_setting.md "Memory per GPU"):

* ``trainer.gradient_checkpointing: auto`` takes the model config's ``gradient_checkpointing``
  (true in the 7-8B configs, whose activations alone exceed an 80 GB GPU at the documented
  micro-batches; false elsewhere); ``true`` / ``false`` override it;
* ``sft.save_every_min`` / ``dpo.save_every_min``: the resumable state's cadence in minutes
  (ibridge/save_schedule.py);
* ``eval.max_batch_tokens``: the token budget of a generation batch (ibridge/evaluation/generate.py);
* ``trainer.tf32``: TF32 matmuls in fp32 scoring passes on GPUs (ibridge/scoring.py).

`validate_resources` checks them with the rest of the config (ibridge/config.py), before any
model loads.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

# eval.max_batch_tokens when a config has none: 8 GiB of bf16 KV cache at Llama-3-8B's
# 128 KiB per token (docs/memory.md, "Generation").
DEFAULT_GENERATION_TOKENS = 65536


def gradient_checkpointing(cfg) -> bool:
    """Whether the stages recompute activations in the backward pass (``trainer.gradient_checkpointing``;
    ``auto``: the model config's ``gradient_checkpointing``, false when it has none)."""
    value = OmegaConf.select(cfg, "trainer.gradient_checkpointing", default="auto")
    if value == "auto":
        return bool(OmegaConf.select(cfg, "model.gradient_checkpointing", default=False))
    return bool(value)


def validate_resources(cfg: DictConfig) -> None:
    """Raise ConfigError for the first invalid setting of this module's."""
    from ibridge.config import STAGE_KEYS, ConfigError

    value = OmegaConf.select(cfg, "trainer.gradient_checkpointing", default="auto")
    if value != "auto" and not isinstance(value, bool):
        raise ConfigError(f"trainer.gradient_checkpointing={value!r}: expected true, false or auto")
    value = OmegaConf.select(cfg, "model.gradient_checkpointing", default=False)
    if not isinstance(value, bool):
        raise ConfigError(f"model.gradient_checkpointing={value!r}: expected true or false")
    for stage in STAGE_KEYS:
        value = OmegaConf.select(cfg, f"{stage}.save_every_min", default=0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{stage}.save_every_min={value!r}: expected a number of minutes >= 0 (0: no timed saves)")
    value = OmegaConf.select(cfg, "eval.max_batch_tokens", default=DEFAULT_GENERATION_TOKENS)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"eval.max_batch_tokens={value!r}: expected a positive number of tokens per generation batch")
    value = OmegaConf.select(cfg, "trainer.tf32", default=True)
    if not isinstance(value, bool):
        raise ConfigError(f"trainer.tf32={value!r}: expected true or false")
    precision = OmegaConf.select(cfg, "trainer.precision", default="auto")
    attn = str(OmegaConf.select(cfg, "trainer.attn_implementation", default="auto"))
    if precision == "fp32" and "flash" in attn:
        raise ConfigError(f"trainer.attn_implementation={attn} runs in fp16/bf16 only, but trainer.precision=fp32: "
                          "use trainer.attn_implementation=sdpa (or auto)")
