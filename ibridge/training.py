"""The optimisation loop every stage shares: pretraining, SFT-family and DPO-family.

Why a loop of our own rather than `transformers.Trainer`: a stage here is a
fixed list of pre-tokenised examples with cached reference log-probs, an
objective that is a pure function of log-prob tensors, and metrics named as in
DESIGN.md §4. The Trainer's features that matter (cosine schedule with warmup,
gradient accumulation and clipping, safetensors checkpoints in Hugging Face
format, seeding, mixed precision) take a few dozen lines; what it adds beyond
them (callbacks, its own logging integrations, dataloader workers) costs
per-step Python time that is most of a step on the toy model.

The loop knows no loss: a stage passes `compute(model, batch) -> ObjectiveOutput`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from ibridge.checkpointing import has_state, load_state, save_state
from ibridge.distributed import full_tensor, parameter_checksums, wrap
from ibridge.packing import PackedForward, packing_supported
from ibridge.runtime import Runtime

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimSettings:
    lr: float
    epochs: int = 1
    max_steps: int = -1
    batch_size: int = 32
    grad_accum: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    log_every: int = 10
    save_every: int = 0  # 0: no mid-stage state (the stage restarts from its beginning)
    eval_every: int = 0  # 0: evaluate only after the last step
    warmup_ratio: float = 0.1
    schedule: str = "cosine"
    seed: int = 0
    # Padding-free packing of each micro-batch where the model supports it
    # (ibridge/packing.py): the same batches, loss and gradients, fewer padded positions.
    pack_sequences: bool = True

    def total_steps(self, n_items: int, world_size: int = 1) -> int:
        per_epoch = max(1, math.ceil(n_items / (self.batch_size * self.grad_accum * world_size)))
        return self.max_steps if self.max_steps > 0 else self.epochs * per_epoch


def micro_batches(n_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
    """Endless shuffled micro-batches of indices, a fresh permutation each epoch.

    Every rank draws the same permutation and takes its share of each global batch
    of ``batch_size * world_size`` (so `batch_size` is per process). A short last
    batch still gives every rank at least one example: DDP needs every rank to step.
    """
    generator = torch.Generator().manual_seed(seed)
    epoch = 0
    step = batch_size * world_size
    while True:
        order = torch.randperm(n_items, generator=generator).tolist()
        for start in range(0, n_items, step):
            chunk = order[start : start + step]
            share = chunk[rank::world_size] or chunk[-1:]
            yield epoch, share
        epoch += 1


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the message names the step."""


@dataclass
class StageSummary:
    steps: int
    runtime_s: float
    tokens: int
    final_metrics: dict[str, float]
    resumed_from: int = 0
    rank_checksums: list[float] | None = None  # per-rank sum of |parameters|: equal when in sync


class TorchUpdate:
    """Backward and optimiser step in plain PyTorch (one process, DDP or FSDP).

    The loop calls `backward(loss)` once per micro-batch and `update(step_loss)` once
    per optimiser step; `ibridge.zero.ZeroUpdate` is the same pair through DeepSpeed.
    """

    def __init__(self, model, optimizer, scheduler, settings: OptimSettings, desc: str):
        self.model = model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.settings, self.desc = settings, desc

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.settings.grad_accum).backward()

    def update(self, step_loss: torch.Tensor, where: str) -> tuple[float, float]:
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm))
        # One host sync per step: the loss and the gradient norm must be finite
        # before the update touches the weights.
        loss_value, norm_value = torch.stack([step_loss, grad_norm.detach().float()]).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            raise NonFiniteLoss(
                f"{self.desc}: {what} is {loss_value if what == 'loss' else norm_value} {where}; "
                "the weights were not updated and the last saved state is kept"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value


class StopRequested(RuntimeError):
    """SIGTERM arrived: the stage saved its state at a step boundary and stopped."""


@contextlib.contextmanager
def stop_on_sigterm():
    """Turn SIGTERM into a flag the loop checks between steps (main thread only)."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag["stop"] = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def optimise(
    model: torch.nn.Module,
    items: list,
    collate: Callable[[list], dict],
    compute: Callable,
    settings: OptimSettings,
    runtime: Runtime,
    log: Callable[[dict, int], None] | None = None,
    desc: str = "train",
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
    state_dir: Path | None = None,
    bookmark: Callable[[], dict] | None = None,
    rewind: Callable[[dict], None] | None = None,
) -> StageSummary:
    """Run `settings.total_steps` optimiser steps of `compute` over shuffled `items`.

    `evaluate(model)`, when given, runs every `settings.eval_every` steps and after
    the last one (in eval mode, without gradients); its metrics are logged at that step.

    With `state_dir`, the full training state is saved every `settings.save_every`
    steps (and on SIGTERM), and a state found there is resumed: model, optimiser,
    scheduler and the data order are restored, and `rewind(bookmark)` drops metrics
    logged after the saved step, so a resumed stage ends exactly as an uninterrupted
    one. The data order needs no saved RNG: it is a pure function of the seed and the
    number of micro-batches consumed.
    """
    if not items:
        raise ValueError(f"{desc}: no training examples")
    dist_info = runtime.dist
    if dist_info.mode == "deepspeed" and state_dir is not None:
        if settings.save_every > 0:
            logger.warning("%s: trainer=deepspeed keeps no mid-stage state (DeepSpeed's checkpoints are pickles, "
                        "which ibridge does not load); a killed stage restarts from its beginning", desc)
        state_dir = None
    gathered_states = dist_info.mode == "fsdp"  # resumable states are gathered from every rank's shard
    model.train()
    # DDP wraps the model; FSDP shards it in place (before the optimiser sees its parameters).
    trained = wrap(model, dist_info, runtime.device, runtime.precision)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.ndim < 2 or "norm" in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        foreach=True,
    )
    total = settings.total_steps(len(items), dist_info.world_size)
    scheduler = get_scheduler(
        settings.schedule if settings.schedule != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=int(settings.warmup_ratio * total),
        num_training_steps=total,
    )
    stream = micro_batches(len(items), settings.batch_size, settings.seed, dist_info.rank, dist_info.world_size)
    done = 0
    payload: dict = {}
    if state_dir is not None and has_state(state_dir):
        payload = load_state(state_dir, model, optimizer, scheduler, sharded=gathered_states)
        done = int(payload["step"])
        for _ in range(done * settings.grad_accum):
            next(stream)
        if rewind is not None and "bookmark" in payload:
            rewind(payload["bookmark"])
    save_every = settings.save_every
    if save_every > 0 and save_every % settings.log_every:
        # Save only where the metrics window is empty, so nothing half-averaged is lost.
        save_every = (save_every // settings.log_every + 1) * settings.log_every

    if dist_info.mode == "deepspeed":
        from ibridge.zero import ZeroUpdate

        updater = ZeroUpdate(model, optimizer, scheduler, settings, runtime, desc)
        trained = updater.module
    else:
        updater = TorchUpdate(model, optimizer, scheduler, settings, desc)
    if settings.pack_sequences and packing_supported(model, runtime):
        trained = PackedForward(trained)

    def save(step: int) -> None:
        # Under FSDP every rank takes part in gathering the state; rank 0 alone writes it.
        if state_dir is not None and (dist_info.is_main or gathered_states):
            extra = {"bookmark": bookmark() if bookmark else {}, "tokens": tokens}
            save_state(state_dir, model, optimizer, scheduler, step, extra, sharded=gathered_states,
                       write=dist_info.is_main)

    window: dict[str, list] = defaultdict(list)
    final: dict[str, float] = {}
    tokens = int(payload.get("tokens", 0))
    window_tokens = 0
    start = window_start = time.perf_counter()
    progress = tqdm(range(done + 1, total + 1), desc=desc, unit="step", dynamic_ncols=True, mininterval=0.5,
                    initial=done, total=total, disable=not dist_info.is_main)
    with stop_on_sigterm() as signal_flag:
        for step in progress:
            step_loss = 0.0
            for _ in range(settings.grad_accum):
                epoch, indices = next(stream)
                batch = to_device(collate([items[i] for i in indices]), runtime.device)
                with runtime.autocast():
                    out = compute(trained, batch)
                updater.backward(out.loss)
                step_loss = step_loss + out.loss.detach() / settings.grad_accum
                for key, value in out.metrics.items():
                    window[key].append(value)
                n_tokens = int(batch["attention_mask"].sum())
                tokens += n_tokens
                window_tokens += n_tokens
            loss_value, norm_value = updater.update(step_loss, f"at step {step} (epoch {epoch + 1})")
            window["train/loss"].append(loss_value)
            window["train/grad_norm"].append(norm_value)
            if step % settings.log_every == 0 or step == total:
                now = time.perf_counter()
                metrics = {key: float(sum(float(v) for v in values) / len(values)) for key, values in window.items()}
                metrics["train/lr"] = scheduler.get_last_lr()[0]
                metrics["train/epoch"] = epoch + 1
                metrics["train/tokens_per_s"] = window_tokens / max(now - window_start, 1e-9)
                progress.set_postfix(loss=f"{metrics['train/loss']:.4f}")
                if log is not None:
                    log(metrics, step)
                final = metrics
                window.clear()
                window_tokens = 0
                window_start = now
            due = settings.eval_every > 0 and step % settings.eval_every == 0
            # Rank 0 evaluates; under FSDP every forward is collective, so every rank does.
            if evaluate is not None and (due or step == total) and (dist_info.is_main or dist_info.sharded):
                model.eval()
                with torch.no_grad():
                    eval_metrics = evaluate(model)
                model.train()
                final.update(eval_metrics)
                if log is not None:
                    log(eval_metrics, step)
                window_start = time.perf_counter()  # evaluation time is not training throughput
            if step < total and save_every > 0 and step % save_every == 0:
                save(step)
            # On SIGTERM, train on to the next logging step (where the metrics window is
            # empty, so the saved state is exact), save, and stop.
            if signal_flag["stop"] and step < total and step % settings.log_every == 0:
                save(step)
                raise StopRequested(f"{desc}: stopped by SIGTERM after step {step}; run the same command to resume")
    progress.close()
    model.eval()
    checksums = parameter_checksums(model, dist_info)
    return StageSummary(steps=total, runtime_s=time.perf_counter() - start, tokens=tokens, final_metrics=final,
                        resumed_from=done, rank_checksums=checksums)
