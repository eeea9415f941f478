"""Run by tests/test_packing.py under torchrun (2 CPU ranks, gloo, DDP); not a test module.

One optimiser step over the uneven examples of tests/weighting_case.py through the loop's
packed forward with the chunked head (ibridge/lmhead.py, forced on: FUSED_HEAD_BYTES = 0),
its weight used outside the model's forward under DDP: the gradient handed to the optimiser
must be the one-batch padded gradient. Rank 0 writes the largest differences to OUT as JSON.
Usage: torchrun --nproc_per_node 2 tests/packing_ddp_worker.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ibridge.packing  # noqa: E402
from ibridge.runtime import Runtime  # noqa: E402
from ibridge.training import OptimSettings, optimise  # noqa: E402
from ibridge.updates import TorchUpdate  # noqa: E402
from tests.torchrun import gloo_ddp_runtime  # noqa: E402
from tests.weighting_case import examples, gradient_gap, one_batch_gradient, parts, tiny_model  # noqa: E402


def packed_step_gradient(kind: str, runtime: Runtime) -> dict:
    captured: dict = {}
    original = TorchUpdate.update

    def spy(self, step_loss, where):
        captured["grads"] = {name: p.grad.detach().clone() for name, p in self.model.named_parameters()}
        captured["packed"] = isinstance(self.trained, torch.nn.parallel.DistributedDataParallel)
        return original(self, step_loss, where)

    TorchUpdate.update = spy
    plans = {"packed": 0}
    plan = ibridge.packing.pack_plan

    def counting(*args):
        out = plan(*args)
        plans["packed"] += out is not None
        return out

    ibridge.packing.pack_plan = counting
    try:
        _, compute, collate, count = parts(kind)
        settings = OptimSettings(lr=1e-3, max_steps=1, batch_size=2, grad_accum=2, max_grad_norm=1e9, log_every=1)
        optimise(tiny_model(), examples(kind), collate, compute, settings, runtime, count_units=count)
    finally:
        TorchUpdate.update = original
        ibridge.packing.pack_plan = plan
    return {"grads": captured["grads"], "ddp": captured["packed"], "packed_batches": plans["packed"]}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    ibridge.packing.FUSED_HEAD_BYTES = 0  # every micro-batch through the chunked head
    with gloo_ddp_runtime() as runtime:
        report = {}
        for kind in ("sft", "dpo"):
            got = packed_step_gradient(kind, runtime)
            _, ref_grads = one_batch_gradient(kind)
            report[kind] = {"ddp": got["ddp"], "packed_batches": got["packed_batches"],
                            **gradient_gap(got["grads"], ref_grads)}
        if runtime.dist.is_main:
            out.write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
