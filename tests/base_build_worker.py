"""Run by tests/test_rank_zero_base.py under torchrun (2 CPU ranks, gloo); not a test module.

Both ranks ask for the toy base model in an empty cache, rank 0 a few seconds after rank 1
(as when a Slurm cell's tasks start unevenly), so that rank 1 would reach the build first.
Each rank then checks that the folder it got holds the weights and loads them.
Usage: torchrun --nproc_per_node 2 tests/base_build_worker.py MODEL_CACHE
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ibridge.data import source_for  # noqa: E402
from ibridge.models import ensure_toy_base, load_model  # noqa: E402
from tests.conftest import compose_config  # noqa: E402
from tests.torchrun import gloo_ddp_runtime  # noqa: E402

if __name__ == "__main__":
    cfg = compose_config(["debug=smoke", f"model.cache_dir={sys.argv[1]}"])
    with gloo_ddp_runtime() as runtime:
        if runtime.dist.rank == 0:
            time.sleep(5)
        base = ensure_toy_base(cfg.model, source_for(cfg.data).world_config, runtime)
        weights = sorted(p.name for p in base.glob("model*.safetensors"))
        assert weights, f"rank {runtime.dist.rank}: {base} holds no weights: {sorted(p.name for p in base.iterdir())}"
        load_model(base, runtime)
