"""Run by tests/test_loss_weighting.py under torchrun (2 CPU ranks, gloo, DDP); not a test module.

For each objective, one optimiser step over the 7 uneven examples of tests/weighting_case.py
(micro-batches of 1 per rank, grad_accum 4: 2 + 2 + 2 + 1 examples, rank 1 a stand-in in
the last) must hand the optimiser the gradient of all 7 in one batch, and log the loss and
every metric of that batch. Rank 0 writes the differences to OUT as JSON.
Usage: torchrun --nproc_per_node 2 tests/loss_weighting_worker.py OUT [KIND,...]   (default: every kind)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.torchrun import gloo_ddp_runtime  # noqa: E402
from tests.weighting_case import (  # noqa: E402
    OBJECTIVES,
    gradient_gap,
    loop_gradient,
    metric_gaps,
    one_batch_gradient,
)


def main(out: Path, kinds: list[str]) -> None:
    torch.set_num_threads(1)
    with gloo_ddp_runtime() as runtime:
        report = {}
        for kind in kinds:
            logged, grads = loop_gradient(kind, batch_size=1, grad_accum=4, runtime=runtime)
            reference, ref_grads = one_batch_gradient(kind)
            report[kind] = {"metrics": metric_gaps(logged, reference), "reference": reference,
                            **gradient_gap(grads, ref_grads)}
        if runtime.dist.is_main:
            out.write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(",") if len(sys.argv) > 2 else list(OBJECTIVES))
