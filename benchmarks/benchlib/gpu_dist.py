"""The GPU check's distributed sections (benchmarks/gpu_check.py): a 1-rank FSDP2 stage with
resume, which one GPU can run, and the collectives, which need two ranks."""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

from benchlib.gpu_model import ModelCase
from benchlib.gpu_report import Skipped
from benchlib.gpu_sections import resume_gap
from ibridge.distributed import DistInfo


@dataclass(frozen=True)
class OneRankGroup(DistInfo):
    """A process group of one rank that ibridge treats as distributed. `DistInfo` counts a world
    of one as not distributed (no wrapping, no collectives), which would skip FSDP altogether;
    here every distributed code path runs (`fully_shard`, gathered states, the collectives) on
    the one GPU there is."""

    @property
    def enabled(self) -> bool:
        return True


@contextlib.contextmanager
def one_rank_group(device, work: Path, mode: str):
    import torch.distributed as dist

    from ibridge.distributed import process_group_backend

    store = work / f"store-{mode}-{time.monotonic_ns()}"
    dist.init_process_group(process_group_backend(device.type), init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield OneRankGroup(rank=0, world_size=1, mode=mode,
                           collective_device=str(device) if device.type == "cuda" else "cpu")
    finally:
        dist.destroy_process_group()


def fsdp_check(case: ModelCase):
    """`trainer=fsdp` on one rank: the model sharded by `ibridge.distributed.shard` (FSDP2,
    bf16 parameters on a GPU), a few sft steps, and a SIGTERM resume from the gathered state
    against the uninterrupted stage, bit for bit under deterministic algorithms."""
    from torch.distributed.tensor import DTensor

    with one_rank_group(case.runtime.device, case.work, "fsdp") as info:
        runtime = replace(case.runtime, dist=info)
        stopped, gap, whole = resume_gap(case, runtime, "-fsdp")
        model = whole.pop("model")
        sharded = all(isinstance(p, DTensor) for p in model.parameters())
        del model
    finite = all(math.isfinite(x) for x in whole["losses"])
    ok = sharded and finite and stopped and gap == 0.0
    return (ok, f"sharded (DTensor parameters): {sharded}; {len(whole['losses'])} steps, {whole['tok_s']:.0f} tok/s, "
            f"peak {whole['peak_mb']:.0f} MiB, losses finite: {finite}; SIGTERM at step 2 stopped: {stopped}, "
            f"max |W_resumed - W_uninterrupted| {gap:.1e} (expected 0)",
            {"gap": gap, "tok_s": whole["tok_s"], "peak_mb": whole["peak_mb"], "losses": whole["losses"]})


def _rank(rank: int, world: int, store: str, on_gpu: bool, out: str) -> None:
    import torch
    import torch.distributed as dist

    from ibridge.distributed import DistInfo, all_reduce_sum, process_group_backend, unwrap, wrap

    torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank}" if on_gpu else "cpu")
    if on_gpu:
        torch.cuda.set_device(rank)
    # A file store: a TCP store lives in rank 0, and a rank still leaving after rank 0 has gone aborts.
    dist.init_process_group(process_group_backend(device.type), init_method=f"file://{store}", rank=rank,
                            world_size=world)
    info = DistInfo(rank=rank, world_size=world, mode="ddp", collective_device=str(device) if on_gpu else "cpu")
    sums = all_reduce_sum([rank + 1.0, 2.0], info)
    torch.manual_seed(0)
    model = wrap(torch.nn.Linear(8, 4), info, device)
    x = torch.randn(16, 8, device=device) * (rank + 1)  # different data per rank
    model(x).pow(2).mean().backward()
    grad = unwrap(model).weight.grad.detach().clone()
    gathered = [torch.zeros_like(grad) for _ in range(world)]
    dist.all_gather(gathered, grad)
    agree = all(torch.equal(g, gathered[0]) for g in gathered)
    if rank == 0:
        Path(out).write_text(json.dumps({"sums": sums, "expected": [world * (world + 1) / 2, 2.0 * world],
                                         "backend": dist.get_backend(), "grads_agree": agree}))
    dist.barrier()
    dist.destroy_process_group()


def collectives_check(ranks: int, on_gpu: bool, work: Path):
    """`ibridge.distributed.all_reduce_sum` and one DDP step over `ranks` processes (NCCL on
    GPUs, gloo on the CPU): the sums, and the ranks' reduced gradients equal."""
    import torch.multiprocessing as mp

    if ranks < 2:
        raise Skipped(f"{ranks} {'GPU' if on_gpu else 'rank'}: the collectives need 2 ranks "
                      f"({'a second GPU' if on_gpu else '--ranks 2'}); the 1-rank FSDP section ran the rest")
    out = work / "collectives.json"
    start = time.perf_counter()
    mp.spawn(_rank, args=(ranks, str(work / "store-collectives"), on_gpu, str(out)), nprocs=ranks, join=True)
    result = json.loads(out.read_text())
    ok = result["sums"] == result["expected"] and result["grads_agree"]
    return (ok, f"{ranks} ranks ({result['backend']}): all_reduce_sum {result['sums']} (expected {result['expected']}), "
            f"DDP gradients agree across ranks: {result['grads_agree']} ({time.perf_counter() - start:.1f} s)",
            {"backend": result["backend"]})
