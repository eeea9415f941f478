"""A real 2-process DDP run on CPU (gloo), launched with torchrun, through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ibridge.tracking import read_metrics
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # whole runs under kills, sweeps, torchrun: `make test` runs them


def test_two_process_ddp_train_stays_in_sync_and_writes_once(tmp_path, model_cache):
    env = {**os.environ, "IBRIDGE_CACHE": str(model_cache), "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "ibridge", "train", "debug=smoke", "trainer=ddp", "trainer.num_threads=1", "sft.max_steps=6",
           "sft.log_every=2", "hydra.run.dir=run"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    sft = results["stages"]["sft"]
    assert results["status"] == "completed" and sft["world_size"] == 2 and sft["steps"] == 6
    first, second = sft["rank_checksums"]
    assert first == second, "the ranks ended with different parameters"
    trained = load_file(str(Path(sft["checkpoint"]) / "model.safetensors"))
    base = load_file(str(Path(sft["init"]) / "model.safetensors"))
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    # Written once, by rank 0: one wandb run, each logged step once.
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]
    assert steps == [2, 4, 6]
