"""Giving a dropped model's memory back before the next one loads (docs/memory.md)."""

from __future__ import annotations

import gc

import torch


def release_memory() -> None:
    """Free what the caller has just dropped: a garbage collection first, because an
    FSDP2-sharded model and a DeepSpeed ZeRO optimiser hold reference cycles that ``del`` alone
    never frees (their GPU memory would stay allocated through the next stage's evaluation),
    then the CUDA caching allocator's free blocks, so that the next model's load sees them."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
