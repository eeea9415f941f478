"""Run by tests/test_loss_weighting.py under torchrun (2 CPU ranks, gloo, DDP); not a test module.

For each objective, one optimiser step over the 7 uneven examples of tests/weighting_case.py
(micro-batches of 1 per rank, grad_accum 4: 2 + 2 + 2 + 1 examples, rank 1 a stand-in in
the last) must hand the optimiser the gradient of all 7 in one batch. Rank 0 writes the
largest differences to OUT as JSON.
Usage: torchrun --nproc_per_node 2 tests/loss_weighting_worker.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ibridge.distributed import DistInfo  # noqa: E402
from ibridge.runtime import Runtime  # noqa: E402
from tests.weighting_case import OBJECTIVES, gradient_gap, loop_gradient, one_batch_gradient  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), mode="ddp")
    runtime = Runtime(device=torch.device("cpu"), precision="fp32", dist=info)
    report = {}
    for kind in OBJECTIVES:
        loss, grads = loop_gradient(kind, batch_size=1, grad_accum=4, runtime=runtime)
        ref_loss, ref_grads = one_batch_gradient(kind)
        report[kind] = {"loss_diff": abs(loss - ref_loss), **gradient_gap(grads, ref_grads)}
    if info.is_main:
        out.write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
