"""Which examples each optimiser step sees, and how much each one weighs.

Two promises every stage keeps, whatever `grad_accum` and the number of processes:

* **An epoch is an epoch.** Each epoch is one shuffled permutation of the examples, cut
  into optimiser steps of up to ``batch_size * grad_accum * world_size`` examples; the
  last step of an epoch is shorter (fewer micro-batches) rather than borrowing examples
  from the next epoch. Every example is seen exactly once per epoch, and the number of
  steps (`steps_per_epoch`) is what the schedule and the progress bar count.
* **A loss averaged over units stays averaged over the whole step.** An objective's
  loss is a mean over its units: scored tokens (`sft`, token-granularity f-divergences),
  sequences (sequence-granularity f-divergences) or pairs (DPO family). A step's
  micro-batches, on every rank, are weighted by their share of the step's units
  (`micro_batch_weight`), so one step over uneven micro-batches has the gradient of the
  same examples in one batch, as transformers does with ``num_items_in_batch``.

A rank whose share of a micro-batch is empty (the last micro-batch of an epoch, with
fewer examples than processes) still runs a forward and backward, since data-parallel
training needs every rank in every gradient reduction: it repeats an example of the
micro-batch as a *stand-in* whose weight is zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MicroBatch:
    """One rank's share of one micro-batch: example indices, or a zero-weight stand-in."""

    indices: list[int]
    stand_in: bool = False


def steps_per_epoch(n_items: int, batch_size: int, grad_accum: int, world_size: int = 1) -> int:
    """Optimiser steps in one epoch: every example once, the last step possibly short."""
    return max(1, math.ceil(n_items / (batch_size * grad_accum * world_size)))


def optimiser_steps(
    n_items: int, batch_size: int, grad_accum: int, seed: int, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[int, list[MicroBatch]]]:
    """Endless ``(epoch, micro-batches)`` per optimiser step, for this rank.

    Every rank draws the same permutation (from `seed`, a fresh one each epoch), so every
    rank agrees on the number of micro-batches in each step; each takes every
    ``world_size``-th example of each micro-batch (`batch_size` is per process). The order
    is a pure function of the seed and the number of steps taken, so resuming needs no RNG
    state: skip the steps already done.
    """
    if n_items <= 0:
        raise ValueError("no training examples")
    generator = torch.Generator().manual_seed(seed)
    per_micro = batch_size * world_size
    per_step = per_micro * grad_accum
    epoch = 0
    while True:
        order = torch.randperm(n_items, generator=generator).tolist()
        for start in range(0, n_items, per_step):
            step_items = order[start : start + per_step]
            micro = []
            for offset in range(0, len(step_items), per_micro):
                chunk = step_items[offset : offset + per_micro]
                share = chunk[rank::world_size]
                micro.append(MicroBatch(share) if share else MicroBatch(chunk[-1:], stand_in=True))
            yield epoch, micro
        epoch += 1


def scored_tokens(batch: dict) -> int:
    """Positions whose label is scored (``labels != -100`` after the shift by one)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def micro_batch_weight(units: int, step_units: int, world_size: int = 1) -> float:
    """Factor on a micro-batch's mean loss so that the step's gradient is the mean over all
    of its units, on every rank: ``units / step_units``, times ``world_size`` because the
    data-parallel gradient reduction (DDP, FSDP, DeepSpeed) averages over ranks."""
    return units * world_size / max(step_units, 1)
