"""The optimisation loop every stage shares: pretraining, SFT-family and DPO-family.

Why a loop of our own rather than `transformers.Trainer`: a stage here is a
fixed list of pre-tokenised examples with cached reference log-probs, an
objective that is a pure function of log-prob tensors, and metrics named as in
docs/design.md §4. The Trainer's features that matter (cosine schedule with warmup,
gradient accumulation and clipping, safetensors checkpoints in Hugging Face
format, seeding, mixed precision) take a few dozen lines; what it adds beyond
them (callbacks, its own logging integrations, dataloader workers) costs
per-step Python time that is most of a step on the toy model.

The loop knows no loss: a stage passes `compute(model, batch) -> ObjectiveOutput`.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import get_scheduler

from ibridge.batching import micro_batch_weight, optimiser_steps, scored_tokens, steps_per_epoch
from ibridge.checkpointing import has_state, load_state, save_state
from ibridge.distributed import all_reduce_sum, parameter_checksums, wrap
from ibridge.packing import training_forward
from ibridge.preemption import resume_hint, signal_name, stop_on_signals
from ibridge.progress import progress_bar
from ibridge.runtime import Runtime
from ibridge.save_schedule import SaveSchedule, restore_window, window_totals
from ibridge.updates import NonFiniteLoss, TorchUpdate

__all__ = ["NonFiniteLoss", "OptimSettings", "StageSummary", "StopRequested", "optimise"]

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
    save_every_min: float = 0.0  # > 0: also a state once this many minutes passed since the last (ibridge/save_schedule.py)
    eval_every: int = 0  # 0: evaluate only after the last step
    warmup_ratio: float = 0.1
    schedule: str = "cosine"
    seed: int = 0
    # Padding-free packing of each micro-batch where the model supports it
    # (ibridge/packing.py): the same batches, loss and gradients, fewer padded positions.
    pack_sequences: bool = True
    # adamw (default) or sgd: the control for how an objective's uniform loss scale reaches the update
    # (AdamW normalises it away, SGD does not; REPRODUCTION.md).
    optimizer: str = "adamw"

    def total_steps(self, n_items: int, world_size: int = 1) -> int:
        """Optimiser steps of the stage: `max_steps`, else `epochs` whole epochs (ibridge/batching.py)."""
        per_epoch = steps_per_epoch(n_items, self.batch_size, self.grad_accum, world_size)
        return self.max_steps if self.max_steps > 0 else self.epochs * per_epoch


OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
"""Optimiser name (a stage's ``optimizer`` setting) -> class; SGD is plain, without momentum."""


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


@dataclass
class StageSummary:
    steps: int
    runtime_s: float
    tokens: int
    final_metrics: dict[str, float]
    resumed_from: int = 0
    rank_checksums: list[float] | None = None  # per-rank sum of |parameters|: equal when in sync


class StopRequested(RuntimeError):
    """SIGTERM (or a Slurm cell's preemption signal) arrived: the stage saved its state at a step
    boundary and stopped."""


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
    count_units: Callable[[dict], int] = scored_tokens,
) -> StageSummary:
    """Run `settings.total_steps` optimiser steps of `compute` over shuffled `items`.

    `compute(model, batch)` returns the batch's mean loss over its units, and
    `count_units(batch)` (on the CPU batch) how many units that mean is over: scored
    tokens (the default), sequences or pairs. Each micro-batch's loss is weighted by its
    share of the units of the whole step, on every rank (ibridge/batching.py), so a step
    has the gradient of its examples in one batch whatever `grad_accum`, the micro-batch
    lengths and the number of processes; every epoch sees every example once.

    `evaluate(model)`, when given, runs every `settings.eval_every` steps and after
    the last one (in eval mode, without gradients), on every rank; its metrics are logged
    at that step.

    With `state_dir`, the full training state is saved every `settings.save_every`
    steps, every `settings.save_every_min` minutes, and at once on SIGTERM (after the step
    in progress; ibridge/save_schedule.py), and a state found there is resumed: model,
    optimiser, scheduler, the data order and the metrics averaged since the last log are
    restored, and `rewind(bookmark)` drops metrics logged after the saved step, so a resumed
    stage ends exactly as an uninterrupted one. The data order needs no saved RNG: it is a
    pure function of the seed and the number of steps taken.

    Logged metrics are over all ranks: the loss is the step's global mean, token counts
    are sums, each of the objectives' metrics is its mean over all its units (pairs,
    sequences or scored tokens: `ObjectiveOutput.metric_units`) in every rank's
    micro-batches since the last log, so it reads the same whatever `grad_accum` and the
    number of processes.
    """
    if not items:
        raise ValueError(f"{desc}: no training examples")
    dist_info = runtime.dist
    world = dist_info.world_size
    state_dir = _state_dir_kept(state_dir, dist_info, settings, desc)
    gathered_states = dist_info.mode == "fsdp"  # resumable states are gathered from every rank's shard
    model.train()
    # DDP wraps the model; FSDP shards it in place (before the optimiser sees its parameters).
    trained = wrap(model, dist_info, runtime.device, runtime.precision)
    total = settings.total_steps(len(items), world)
    optimizer, scheduler = _optimiser_and_schedule(model, settings, total)
    stream = optimiser_steps(len(items), settings.batch_size, settings.grad_accum, settings.seed,
                             dist_info.rank, world)
    done, payload = _resume(state_dir, model, optimizer, scheduler, stream, rewind, gathered_states)
    schedule = SaveSchedule(settings.save_every, settings.save_every_min, last_saved=done)
    updater = _updater(model, trained, optimizer, scheduler, settings, runtime, desc)
    trained = training_forward(updater.trained, model, runtime, pack=settings.pack_sequences)
    report = _Reporter(scheduler, updater, log, dist_info)
    restore_window(report.window, payload.get("window"), dist_info)
    tokens = int(payload.get("tokens", 0))
    earlier_runtime = float(payload.get("runtime_s", 0.0))  # training time before the saved state
    start = time.perf_counter()

    def save(step: int) -> None:
        # Every rank calls (under FSDP each takes part in gathering the state); rank 0 alone
        # writes it, and the others wait for it in save_state's barrier.
        if state_dir is not None and step > schedule.last_saved:
            extra = {"bookmark": bookmark() if bookmark and dist_info.is_main else {}, "tokens": tokens,
                     "window": window_totals(report.window, dist_info),
                     "runtime_s": earlier_runtime + time.perf_counter() - start}  # the whole stage's, so far
            save_state(state_dir, model, optimizer, scheduler, step, extra, sharded=gathered_states,
                       write=dist_info.is_main, info=dist_info)
            schedule.saved(step)

    progress = progress_bar(range(done + 1, total + 1), desc=desc, unit="step", initial=done, total=total,
                            disable=not dist_info.is_main)
    with stop_on_signals() as signal_flag:
        for step in progress:
            epoch, plan = next(stream)
            batches, units, local_tokens = _step_batches(plan, items, collate, count_units)
            # One collective per step (none in one process): the step's units and tokens over
            # all ranks, and whether any rank got SIGTERM or finds a timed save due, so that all
            # save (the state after the previous step) and stop at the same step.
            step_units, step_tokens, stops, time_due = all_reduce_sum(
                [sum(units), local_tokens, float(signal_flag["stop"]), float(schedule.time_due())], dist_info)
            if stops > 0 or time_due > 0:
                save(step - 1)
            if stops > 0:
                raise StopRequested(f"{desc}: stopped by {signal_name(signal_flag['signal'])} after step {step - 1}; "
                                    f"{resume_hint()}")
            step_loss = _accumulate(plan, batches, units, step_units, trained, compute, updater, runtime,
                                    report.window)
            step_tokens = int(step_tokens)
            tokens += step_tokens
            report.add_step(step_tokens, *updater.update(step_loss, f"at step {step} (epoch {epoch + 1})"))
            if step % settings.log_every == 0 or step == total:
                report.log_window(step, epoch, progress)
            due = settings.eval_every > 0 and step % settings.eval_every == 0
            # Every rank evaluates (its share; under FSDP every forward is a collective anyway).
            if evaluate is not None and (due or step == total):
                report.evaluate(model, evaluate, step)
            if step < total and schedule.step_due(step):
                save(step)
    progress.close()
    checksums = _finish(model, evaluate, updater, dist_info)
    return StageSummary(steps=total, runtime_s=earlier_runtime + time.perf_counter() - start, tokens=tokens,
                        final_metrics=report.final, resumed_from=done, rank_checksums=checksums)


def _resume(state_dir: Path | None, model, optimizer, scheduler, stream, rewind, gathered: bool) -> tuple[int, dict]:
    """``(steps done, saved payload)``: a state found in `state_dir` loaded into the model,
    optimiser and scheduler, the data stream advanced past its steps and the logged metrics
    rewound to it; ``(0, {})`` when there is none."""
    if state_dir is None or not has_state(state_dir):
        return 0, {}
    payload = load_state(state_dir, model, optimizer, scheduler, sharded=gathered)
    done = int(payload["step"])
    for _ in range(done):
        next(stream)
    if rewind is not None and "bookmark" in payload:
        rewind(payload["bookmark"])
    return done, payload


def _finish(model, evaluate, updater, dist_info) -> list[float]:
    """After the last step: free the evaluation's models and DeepSpeed's engine around the
    per-rank parameter checksums (which gather under FSDP and ZeRO-3); returns the checksums."""
    if evaluate is not None and hasattr(evaluate, "close"):
        evaluate.close()  # its models (the kl/token reference) go before the checksums' gathers
    model.eval()
    checksums = parameter_checksums(model, dist_info)
    if hasattr(updater, "close"):
        updater.close()  # DeepSpeed's engine: its memory goes with the model (ibridge/zero.py)
    return checksums


def _state_dir_kept(state_dir: Path | None, dist_info, settings: OptimSettings, desc: str) -> Path | None:
    """Where the stage keeps its resumable state: `state_dir`, or None under DeepSpeed."""
    if dist_info.mode == "deepspeed" and state_dir is not None:
        if settings.save_every > 0:
            logger.warning("%s: trainer=deepspeed keeps no mid-stage state (DeepSpeed's checkpoints are pickles, "
                           "which ibridge does not load); a killed stage restarts from its beginning", desc)
        return None
    return state_dir


def _optimiser_and_schedule(model: torch.nn.Module, settings: OptimSettings, total: int):
    """The stage's optimiser (weight decay on matrices only, not on norms and biases) and its
    learning-rate schedule over `total` steps, warmed up over `settings.warmup_ratio` of them."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.ndim < 2 or "norm" in n)]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if settings.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={settings.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
    optimizer = OPTIMIZERS[settings.optimizer](groups, lr=settings.lr, foreach=True)
    scheduler = get_scheduler(
        settings.schedule if settings.schedule != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=int(settings.warmup_ratio * total),
        num_training_steps=total,
    )
    return optimizer, scheduler


def _updater(model, trained, optimizer, scheduler, settings: OptimSettings, runtime: Runtime, desc: str):
    """What applies a step: DeepSpeed's engine (ibridge/zero.py) or torch's optimiser (ibridge/updates.py)."""
    if runtime.dist.mode == "deepspeed":
        from ibridge.zero import ZeroUpdate

        return ZeroUpdate(model, optimizer, scheduler, settings, runtime, desc)
    return TorchUpdate(model, trained, optimizer, scheduler, settings.max_grad_norm, desc)


def _step_batches(plan, items: list, collate: Callable, count_units: Callable) -> tuple[list, list[int], int]:
    """One step's micro-batches on this rank, the units each is a mean over (0 for a stand-in,
    which only keeps the ranks' collectives paired), and this rank's real tokens."""
    batches = [collate([items[i] for i in micro.indices]) for micro in plan]
    units = [0 if micro.stand_in else count_units(batch) for micro, batch in zip(plan, batches, strict=True)]
    local_tokens = sum(int(batch["attention_mask"].sum())
                       for micro, batch in zip(plan, batches, strict=True) if not micro.stand_in)
    return batches, units, local_tokens


def _accumulate(plan, batches: list, units: list[int], step_units: float, trained, compute: Callable, updater,
                runtime: Runtime, window: dict) -> torch.Tensor:
    """Forward and backward every micro-batch of a step, each loss weighted by its share of the
    step's units over all ranks (ibridge/batching.py); adds the objectives' metrics to `window`
    weighted by their units. Returns this rank's share of the step's mean loss."""
    world = runtime.dist.world_size
    step_loss = torch.zeros((), device=runtime.device)
    for k, (micro, batch, n) in enumerate(zip(plan, batches, units, strict=True)):
        weight = micro_batch_weight(n, step_units, world)
        with updater.accumulating(last=k == len(plan) - 1):
            with runtime.autocast():
                out = compute(trained, to_device(batch, runtime.device))
            updater.backward(out.loss * weight)
        step_loss = step_loss + out.loss.detach().float() * (weight / world)
        real = 0.0 if micro.stand_in else 1.0  # a stand-in adds its keys, not its values
        for key, value in out.metrics.items():
            # Weighted by its units (pairs, sequences, tokens), as the loss is; no host sync here.
            units_here = out.metric_units[key] * real
            window[key][0] = window[key][0] + value.detach() * units_here
            window[key][1] = window[key][1] + units_here
    return step_loss


class _Reporter:
    """The metrics since the last log (`window`: per key [sum of values x units, units] over this
    rank's real micro-batches, or steps for train/loss and train/grad_norm), logged every
    `log_every` steps and after evaluations; `final` holds the last logged ones."""

    def __init__(self, scheduler, updater, log: Callable[[dict, int], None] | None, dist_info):
        self.scheduler, self.updater, self.log, self.dist_info = scheduler, updater, log, dist_info
        self.window: dict[str, list] = defaultdict(lambda: [0.0, 0.0])
        self.final: dict[str, float] = {}
        self.window_tokens = 0
        self.window_start = time.perf_counter()

    def add_step(self, tokens: int, loss_value, norm_value) -> None:
        """One applied (or fp16-skipped) step: its tokens over all ranks, its loss and norm."""
        self.window_tokens += tokens
        for key, value in (("train/loss", loss_value), ("train/grad_norm", norm_value)):
            if value is not None:  # None: a norm DeepSpeed's fp16 loss scaler skipped (ibridge/zero.py)
                self.window[key][0] += value
                self.window[key][1] += 1

    def log_window(self, step: int, epoch: int, progress) -> None:
        now = time.perf_counter()
        metrics = _window_means(self.window, self.dist_info)
        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
        metrics["train/epoch"] = epoch + 1
        metrics["train/tokens_per_s"] = self.window_tokens / max(now - self.window_start, 1e-9)
        metrics.update(self.updater.counters() if hasattr(self.updater, "counters") else {})
        progress.set_postfix(loss=f"{metrics['train/loss']:.4f}")
        if self.log is not None:
            self.log(metrics, step)
        self.final = metrics
        self.window.clear()
        self.window_tokens = 0
        self.window_start = now

    def evaluate(self, model: torch.nn.Module, evaluate: Callable, step: int) -> None:
        model.eval()
        with torch.no_grad():
            eval_metrics = evaluate(model)
        model.train()
        self.final.update(eval_metrics)
        if self.log is not None:
            self.log(eval_metrics, step)
        self.window_start = time.perf_counter()  # evaluation time is not training throughput


def _window_means(window: dict[str, list[float]], dist_info) -> dict[str, float]:
    """Each key's mean over the window, across ranks. The loss is already the step's global
    mean divided among ranks (each rank holds its micro-batches' share), so its rank sums add
    up; every other key is a mean over all ranks' units (or steps). One collective."""
    keys = sorted(window)
    flat = [float(x) for key in keys for x in window[key]]
    totals = all_reduce_sum(flat, dist_info)
    means = {}
    for i, key in enumerate(keys):
        value_sum, count = totals[2 * i], totals[2 * i + 1]
        if key == "train/loss":
            means[key] = value_sum / max(count / dist_info.world_size, 1.0)
        else:
            means[key] = value_sum / max(count, 1.0)
    return means
