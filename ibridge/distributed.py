"""Data-parallel training across processes (torchrun), with rank 0 the only writer.

Launch with ``torchrun --nproc_per_node N -m ibridge train trainer=ddp ...`` (or
``trainer=fsdp`` / ``trainer=deepspeed``): every rank runs the same Hydra app with the same overrides, so
every rank resolves the same run folder, but only rank 0 writes into it (config,
metrics, checkpoints, results.json, wandb). Each rank takes its share of every
global batch, so `batch_size` is per process.

Three modes, the same maths (gradients averaged over ranks):

* ``ddp``: DistributedDataParallel; every rank holds the whole model and optimiser.
* ``fsdp``: PyTorch's fully sharded data parallel (FSDP2, ``fully_shard``), one
  shard group per decoder layer. Parameters, gradients and AdamW state are split
  across ranks: ZeRO stage 3 when ``trainer.fsdp.reshard_after_forward`` is true (the
  default), ZeRO stage 2 when it is false (full layers stay gathered between forward
  and backward: more memory, less communication). Needed for full fine-tuning of a
  7-8B model, whose fp32 weights, gradients and AdamW moments (16 bytes/parameter,
  ~128 GB) fit no single GPU. State dicts are gathered to full tensors for saving,
  so checkpoints and resumable states have the same format in every mode.
* ``deepspeed``: DeepSpeed ZeRO-1/2/3, an engine around the same loop (ibridge/zero.py).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ibridge import launch_env
from ibridge.launch_env import DATA_PARALLEL_MODES  # noqa: F401 - its old home: ibridge.config imports it from here

# The first torch release whose public torch.distributed.fsdp exports FSDP2's fully_shard and
# MixedPrecisionPolicy (before: torch.distributed._composable.fsdp). pyproject.toml's floor.
FSDP2_MIN_TORCH = "2.6"
# NCCL's own default is 10 minutes; a collective that waits longer than this on a slow
# rank (a reference pass, a checkpoint write) aborts the job. trainer.dist_timeout_min.
DEFAULT_TIMEOUT_MIN = 60


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # The CUDA device of this rank: its local rank, or 0 where Slurm binds one GPU to each task.
    device_index: int = 0
    mode: str = "none"  # "none" or one of DATA_PARALLEL_MODES
    reshard_after_forward: bool = True  # fsdp only: ZeRO-3 (True) or ZeRO-2 (False)
    zero_stage: int = 0  # deepspeed only: 1, 2 or 3
    # Where tensors handed to collectives live: NCCL takes only CUDA tensors, so every
    # collective of ibridge's own (counts, metrics, checksums) builds its tensor here.
    collective_device: str = "cpu"
    # The process group's timeout (trainer.dist_timeout_min): how long a rank may wait in a
    # collective for the others, e.g. while rank 0 writes a resumable state.
    timeout_min: float = DEFAULT_TIMEOUT_MIN

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """Parameters are split across ranks: every forward is a collective call."""
        return self.enabled and (self.mode == "fsdp" or (self.mode == "deepspeed" and self.zero_stage == 3))


def launched_world_size() -> int:
    return launch_env.detect().world_size


def process_group_backend(device_type: str) -> str:
    """``cpu:gloo,cuda:nccl`` on GPUs: NCCL for the device tensors of training, gloo beside
    it so that a CPU tensor reaching a collective (a library's, say) still works rather
    than crashing the job after hours of training; plain gloo on CPU."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def init_distributed(trainer_cfg) -> DistInfo:
    """Join the process group of a torchrun job or of a Slurm step's tasks (ibridge/launch_env.py);
    a no-op in a single process. A data-parallel trainer without such a job, or several processes
    without one, is a ConfigError: either would run silently wrong."""
    mode = trainer_cfg.get("distributed", "none")
    launch = launch_env.detect()
    launch_env.check(mode, launch)
    world = launch.world_size
    if world <= 1:
        return DistInfo()
    launch_env.export(launch)  # a Slurm step: torch's env:// variables, as torchrun sets them
    on_gpu = torch.cuda.is_available() and trainer_cfg.get("device", "auto") != "cpu"
    local_rank = launch.local_rank
    device_index = (launch_env.cuda_device_index(local_rank, launch.local_world_size, torch.cuda.device_count())
                    if on_gpu else 0)
    if on_gpu:
        torch.cuda.set_device(device_index)
    timeout = datetime.timedelta(minutes=float(trainer_cfg.get("dist_timeout_min", DEFAULT_TIMEOUT_MIN)))
    if not dist.is_initialized():
        dist.init_process_group(backend=process_group_backend("cuda" if on_gpu else "cpu"), timeout=timeout)
    fsdp_cfg = trainer_cfg.get("fsdp") or {}
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    device_index=device_index, mode=mode,
                    reshard_after_forward=bool(fsdp_cfg.get("reshard_after_forward", True)),
                    zero_stage=int((trainer_cfg.get("deepspeed") or {}).get("zero_stage", 0)) if mode == "deepspeed" else 0,
                    collective_device=f"cuda:{device_index}" if on_gpu else "cpu",
                    timeout_min=timeout.total_seconds() / 60)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise sum of `values` over the ranks (float64, on the collective device);
    `values` itself in a single process. One collective, one host sync."""
    if not info.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=info.collective_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def shard_of(n: int, info: DistInfo) -> range:
    """This rank's share of `n` work items (batches, prompt blocks): every `world_size`-th
    one from its rank on. Round-robin over items already sorted by size (the token-budget
    batches are) gives each rank the same mix of long and short ones."""
    return range(info.rank, n, info.world_size) if info.enabled else range(n)


def all_gather_objects(value, info: DistInfo) -> list:
    """Every rank's `value` (any picklable object: CPU tensors, lists, dicts), in rank
    order, on every rank. Objects travel through the CPU side of the process group (gloo;
    ``cpu:gloo,cuda:nccl`` on GPUs), so nothing is copied to a GPU."""
    if not info.enabled:
        return [value]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, value)
    return out


def broadcast_from_main(value, info: DistInfo):
    """Rank 0's `value` on every rank (the others pass anything, e.g. None)."""
    if not info.enabled:
        return value
    box = [value if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def merge_shares(partial: list, info: DistInfo) -> list:
    """The whole list on every rank, from each rank's `partial` copy: the same length
    everywhere, filled (not None) at the positions that rank computed, None elsewhere."""
    if not info.enabled:
        return partial
    merged = list(partial)
    for share in all_gather_objects({i: v for i, v in enumerate(partial) if v is not None}, info):
        for index, value in share.items():
            merged[index] = value
    missing = sum(value is None for value in merged)
    if missing:
        raise RuntimeError(f"merge_shares: {missing} of {len(merged)} items were computed by no rank")
    return merged


def require_deepspeed():
    try:
        import deepspeed
    except ImportError as err:  # an optional extra: say how to get it
        raise RuntimeError(
            "trainer=deepspeed needs DeepSpeed: pip install --no-build-isolation -e '.[deepspeed]' "
            "(after torch), or use trainer=fsdp for the same sharding inside PyTorch"
        ) from err
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # one INFO line per step otherwise
    return deepspeed


def gathered(model: torch.nn.Module, info: DistInfo, parameters=None):
    """Under ZeRO-3, `parameters` (default: all of `model`'s) gathered whole inside the
    block (a collective call); a no-op otherwise."""
    if info.mode != "deepspeed" or info.zero_stage != 3:
        return contextlib.nullcontext()
    deepspeed = require_deepspeed()
    return deepspeed.zero.GatheredParameters(list(parameters if parameters is not None else model.parameters()),
                                             modifier_rank=None)


def wrap(model: torch.nn.Module, info: DistInfo, device: torch.device, precision: str = "fp32") -> torch.nn.Module:
    """The module the loop calls: `model` itself, DDP around it, or `model` sharded in place.

    Call before building the optimiser: sharding replaces the parameters by DTensors.
    """
    if not info.enabled or info.mode == "deepspeed":  # DeepSpeed's engine wraps it later (ibridge/zero.py)
        return model.to(device)
    if info.mode == "fsdp":
        return shard(model, info, device, precision)
    from torch.nn.parallel import DistributedDataParallel

    model.to(device)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def shard(model: torch.nn.Module, info: DistInfo, device: torch.device, precision: str) -> torch.nn.Module:
    """FSDP2: one shard group per transformer block (`_no_split_modules`), then the rest.

    The model may still be on the CPU: each rank moves only its own shard to `device`,
    so a 7-8B model never sits whole on one GPU. With bf16, the gathered weights and the
    forward run in bf16 while the sharded master weights and the gradient reduction
    stay fp32. This is *not* the numerics of bf16 autocast over fp32 weights: here the
    residual stream between layers is bf16 too. The reference pass therefore runs on bf16
    weights under FSDP (`ibridge.models.reference_pass_dtype`), so that the implicit reward
    of the untrained policy is zero and not numerical noise.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (info.world_size,))
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None)
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in block_names]
    if not blocks:
        raise RuntimeError(
            f"trainer=fsdp: {type(model).__name__} names no transformer blocks (_no_split_modules); "
            "use trainer=ddp for this model"
        )
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=info.reshard_after_forward)
    # The root group (embeddings, final norm, head) is gathered for the whole step anyway.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value gathered whole on every rank; a plain tensor as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def full_model_state(model: torch.nn.Module, info: DistInfo) -> dict[str, torch.Tensor] | None:
    """Under FSDP or ZeRO-3, every weight gathered to full CPU tensors on rank 0 (a
    collective call: every rank must make it); None otherwise: "save the module as it is"."""
    if not info.sharded:
        return None
    if info.mode == "deepspeed":
        # One module's own parameters at a time: never the whole model gathered on a GPU,
        # and only rank 0 keeps (and pays for) the CPU copy.
        state = {}
        for prefix, module in model.named_modules():
            own = list(module.parameters(recurse=False))
            with gathered(model, info, own):
                if info.is_main:
                    for name, value in module.state_dict(keep_vars=False).items():
                        if "." not in name:  # this module's own tensors; children come in their turn
                            state[f"{prefix}.{name}" if prefix else name] = value.detach().cpu().clone()
        if not info.is_main:
            return None
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Tied weights (lm_head = embed_tokens) come back as separate copies under both names;
    # keep one name per parameter, as save_pretrained does for an unsharded model.
    kept = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: value for name, value in state.items() if name in kept}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(
        model, torch.nn.parallel.DistributedDataParallel) else model


# Elements of a parameter summed at once in `parameter_checksums`: a float64 copy of 2**24 values
# (128 MiB), never of a whole parameter (the 8B embedding is 525M values: 4.2 GB in float64).
CHECKSUM_ELEMENTS = 2**24


def parameter_checksums(model: torch.nn.Module, info: DistInfo) -> list[float]:
    """Each rank's sum of |parameters| (float64), gathered: equal when the ranks agree.

    One module's own parameters at a time (a parameter shared by two modules, a tied head,
    counted once), as `full_model_state` gathers them: under ZeRO-3 never the whole model
    gathered at once, under FSDP one parameter; each summed in float64 chunks of
    `CHECKSUM_ELEMENTS`. Every rank must call it under FSDP / ZeRO-3 (the gathers are collective).
    """
    base = unwrap(model)
    seen: set[int] = set()
    total = 0.0
    for module in base.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        if not own:
            continue
        seen.update(id(p) for p in own)
        with gathered(base, info, own):
            for param in own:
                flat = full_tensor(param.detach()).reshape(-1)
                total += sum(float(chunk.double().abs().sum()) for chunk in flat.split(CHECKSUM_ELEMENTS))
    if not info.enabled:
        return [total]
    # On the collective device: NCCL has no CPU tensors.
    mine = torch.tensor([total], dtype=torch.float64, device=info.collective_device)
    everyone = [torch.zeros_like(mine) for _ in range(info.world_size)]
    dist.all_gather(everyone, mine)
    return [float(x) for x in torch.cat(everyone).tolist()]


def shutdown(info: DistInfo, failed: bool = False) -> None:
    """Leave the process group. After a clean run, a barrier first: a rank that tears its
    group down while another is still in a collective aborts the process ("terminate
    called without an active exception"). After a failure, no barrier: the other ranks
    are in some other collective, and waiting for them would turn one rank's error into a
    hang until the timeout; this process ends, torchrun sees the non-zero exit and stops
    the others."""
    if info.enabled and dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()
