"""Data-parallel training across processes (torchrun), with rank 0 the only writer.

Launch with ``torchrun --nproc_per_node N -m ibridge train trainer=ddp ...``: every
rank runs the same Hydra app with the same overrides, so every rank resolves the
same run folder, but only rank 0 writes into it (config, metrics, checkpoints,
results.json, wandb). Gradients are averaged by DistributedDataParallel; each rank
takes its share of every global batch, so `batch_size` is per process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(trainer_cfg) -> DistInfo:
    """Join the process group torchrun set up; a no-op in a single process."""
    mode = trainer_cfg.get("distributed", "none")
    world = launched_world_size()
    if world <= 1:
        return DistInfo()
    if mode != "ddp":
        raise RuntimeError(
            f"launched with {world} processes but trainer.distributed={mode!r}: use trainer=ddp "
            "(or launch a single process)"
        )
    backend = "nccl" if torch.cuda.is_available() and trainer_cfg.get("device", "auto") != "cpu" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    return info


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def wrap(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(
        model, torch.nn.parallel.DistributedDataParallel) else model


def parameter_checksums(model: torch.nn.Module, info: DistInfo) -> list[float]:
    """Each rank's sum of |parameters| (float64), gathered: equal when the ranks agree."""
    total = torch.tensor(sum(float(p.detach().double().abs().sum()) for p in unwrap(model).parameters()),
                         dtype=torch.float64)
    if not info.enabled:
        return [float(total)]
    gathered = [torch.zeros_like(total) for _ in range(info.world_size)]
    dist.all_gather(gathered, total)
    return [float(x) for x in gathered]


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
