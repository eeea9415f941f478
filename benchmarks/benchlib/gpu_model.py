"""One model's set-up for the GPU check, and its training runs through the stages' own code:
`load_trainable` (LoRA, gradient checkpointing, sharding as a stage does), the reference cache,
`ibridge.training.optimise` with the stages' objectives (benchmarks/gpu_check.py)."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

OBJECTIVES = {"sft": {"name": "sft"}, "jsd": {"name": "jsd", "granularity": "token"}, "dpo": {"name": "dpo", "beta": 0.1}}
LORA = {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")


def peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM")) / 1024


@dataclass
class ModelCase:
    """A model folder and its data, built on first use; a failed build fails, with its reason,
    every section that asks for it (and is not retried)."""

    name: str
    build: object  # () -> (base folder, {kind: examples}, max_length, cfg or None)
    runtime: object
    work: Path
    steps: int
    batch: int
    _built: tuple | None = None
    _error: BaseException | None = None
    _items: dict = field(default_factory=dict)

    def built(self) -> tuple:
        if self._error is not None:
            raise RuntimeError(f"{self.name} set-up failed earlier: {type(self._error).__name__}: {self._error}")
        if self._built is None:
            try:
                base, data, max_length, cfg = self.build()
                tokenizer, encoded = encoded_splits(base, data, max_length)
                self._built = (base, data, max_length, cfg, tokenizer, encoded)
            except BaseException as err:
                self._error = err
                raise
        return self._built

    @property
    def base(self) -> Path:
        return self.built()[0]

    @property
    def tokenizer(self):
        return self.built()[4]

    def encoded(self, kind: str) -> list:
        return self.built()[5][kind]

    def items(self, kind: str, runtime=None) -> list:
        """The split with reference log-probs from the reference cache, for `runtime`'s numerics."""
        runtime = runtime or self.runtime
        key = (kind, runtime.precision, runtime.lora, runtime.dist.mode)
        if key not in self._items:
            self._items[key] = with_reference(self.encoded(kind), kind, self.base, runtime, self.tokenizer.pad_token_id,
                                              self.work / f"cache-{self.name}")
        return self._items[key]


def encoded_splits(base: Path, data: dict, max_length: int):
    from transformers import PreTrainedTokenizerFast

    from ibridge.data.formatting import encode_split, prepare_tokenizer

    # The tokenizer as saved: AutoTokenizer would give a Qwen2 config Qwen's own BPE class,
    # which rebuilds the word-level test tokenizer into something else.
    tokenizer = prepare_tokenizer(PreTrainedTokenizerFast.from_pretrained(base))
    return tokenizer, {kind: encode_split(tokenizer, data[kind], kind, max_length)[0]
                       for kind in ("demonstrations", "preferences")}


def with_reference(encoded: list, kind: str, base: Path, runtime, pad: int, cache: Path) -> list:
    """A copy of the split with reference log-probs from the cache at `cache` (ibridge/refcache.py)."""
    from omegaconf import OmegaConf

    from ibridge.stages import attach_reference

    items = [dict(e) for e in encoded]
    ctx = SimpleNamespace(cfg=OmegaConf.create({"model": {"cache_dir": str(cache)}}), runtime=runtime)
    attach_reference(items, kind, base, ctx, pad)
    return items


def stage_context(runtime, lora: bool = False, checkpointing: bool = False):
    """What `ibridge.stages.load_trainable` reads: trainer.gradient_checkpointing, model.lora."""
    from dataclasses import replace

    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"trainer": {"gradient_checkpointing": checkpointing},
                            "model": {"lora": LORA if lora else {"enabled": False}}})
    return SimpleNamespace(cfg=cfg, runtime=replace(runtime, lora=lora))


def train(case: ModelCase, runtime, objective: str, *, steps: int | None = None, lr: float | None = None,
          state_dir: Path | None = None, stop_after: int = 0, lora: bool = False, checkpointing: bool = False,
          keep_model: bool = False) -> dict:
    """`steps` optimiser steps as a stage runs them (`load_trainable`, `optimise`): the logged
    losses, tokens/s, peak memory, the final weights (gathered under FSDP) and, with
    `keep_model`, the model. `stop_after`: SIGTERM to this process after that step."""
    from ibridge.data.collate import collate_demonstrations, collate_pairs
    from ibridge.distributed import full_model_state
    from ibridge.objectives import build_objective
    from ibridge.stages import demonstration_step, load_trainable, loss_units, preference_step
    from ibridge.training import OptimSettings, optimise

    spec = build_objective(OBJECTIVES[objective])
    demos = spec.data_kind == "demonstrations"
    ctx = stage_context(runtime, lora, checkpointing)
    items = case.items(spec.data_kind, ctx.runtime)
    pad = case.tokenizer.pad_token_id
    collate = collate_demonstrations if demos else collate_pairs
    losses: list[float] = []

    def log(metrics: dict, step: int) -> None:
        if "train/loss" in metrics:
            losses.append(metrics["train/loss"])
        if stop_after and step == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop saves and stops (ibridge/training.py)

    model = load_trainable(case.base, ctx)
    reset_peak(runtime.device)
    start = time.perf_counter()
    steps = steps or case.steps
    settings = OptimSettings(lr=lr or (1e-4 if demos else 5e-6), max_steps=steps, batch_size=case.batch, log_every=1,
                             warmup_ratio=0.0, seed=0)
    summary = optimise(model, items, lambda chunk: collate(chunk, pad),
                       demonstration_step(spec) if demos else preference_step(spec), settings, ctx.runtime, log=log,
                       state_dir=state_dir, count_units=loss_units(spec))
    seconds = time.perf_counter() - start
    gathered = full_model_state(model, ctx.runtime.dist)
    weights = gathered if gathered is not None else model.state_dict()
    run = {"losses": losses, "tok_s": summary.tokens / seconds, "tokens": summary.tokens, "seconds": seconds,
           "peak_mb": peak_mb(runtime.device),
           "weights": {k: v.detach().float().cpu().clone() for k, v in weights.items()}}
    if keep_model:
        run["model"] = model
    return run


def max_gap(first: dict, second: dict) -> tuple[float, float]:
    """(max |first - second| over all weights, max |first|): the resume and checkpointing checks."""
    gap = max(float((first[k] - second[k]).abs().max()) for k in first)
    scale = max(float(v.abs().max()) for v in first.values())
    return gap, scale
