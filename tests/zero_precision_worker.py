"""Run by tests/test_zero_precision.py under torchrun (2 CPU ranks, gloo); not a test module.

DeepSpeed ZeRO-3 under ``precision=bf16``, as a stage runs it: the policy loaded by
`load_trainable`, reference log-probs from the project's reference pass (bf16 weights,
`reference_pass_dtype`), one optimiser step of token-granularity jsd. A second case hands
`optimise` an fp32-loaded module, which `ZeroUpdate` must cast before partitioning. Rank 0
writes, per case, the partitions' dtypes, the gathered checkpoint's dtypes and the first
step's logged implicit reward and log-probs to OUT as JSON.
Usage: torchrun --nproc_per_node 2 tests/zero_precision_worker.py MODEL_FOLDER OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ibridge.data.collate import collate_demonstrations  # noqa: E402
from ibridge.distributed import DistInfo, full_model_state  # noqa: E402
from ibridge.models import load_model  # noqa: E402
from ibridge.objectives import build_objective  # noqa: E402
from ibridge.refcache import cached_reference_logps  # noqa: E402
from ibridge.runtime import Runtime  # noqa: E402
from ibridge.stages import demonstration_step, load_trainable, loss_units  # noqa: E402
from ibridge.training import OptimSettings, optimise  # noqa: E402
from tests.weighting_case import PAD, examples  # noqa: E402


def first_step(model, items, runtime) -> dict:
    objective = build_objective({"name": "jsd", "beta": 0.5, "granularity": "token"})
    settings = OptimSettings(lr=1e-3, max_steps=1, batch_size=2, grad_accum=2, log_every=1)
    logged: list = []
    optimise(model, items, lambda batch: collate_demonstrations(batch, PAD), demonstration_step(objective), settings,
             runtime, log=lambda metrics, step: logged.append(metrics), count_units=loss_units(objective))
    partitions = sorted({str(p.ds_tensor.dtype) for p in model.parameters()})
    state = full_model_state(model, runtime.dist)
    return {"partitions": partitions, "checkpoint": sorted({str(v.dtype) for v in state.values()}) if state else [],
            **{key: logged[0][key] for key in ("implicit/reward", "logps/policy", "logps/ref")}}


def main(folder: Path, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), mode="deepspeed", zero_stage=3)
    runtime = Runtime(device=torch.device("cpu"), precision="bf16", dist=info)
    items = examples("jsd_token")
    references = cached_reference_logps(folder, items, runtime, PAD, folder.parent / "cache")
    for item, ref in zip(items, references, strict=True):
        item["ref_logps"] = ref
    ctx = SimpleNamespace(cfg=OmegaConf.create({"trainer": {}, "model": {}}), runtime=runtime)
    report = {"load_trainable": first_step(load_trainable(folder, ctx), items, runtime),
              "fp32 module": first_step(load_model(folder, runtime, on_device=False), items, runtime)}
    if info.is_main:
        out.write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
