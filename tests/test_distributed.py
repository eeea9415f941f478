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
from tests.torchrun import free_port, run_worker, torchrun_command

pytestmark = pytest.mark.slow  # whole runs under kills, sweeps, torchrun: `make test` runs them


def torchrun_train(cwd: Path, model_cache: Path, *overrides: str) -> dict:
    """`torchrun --nproc_per_node 2 -m ibridge train debug=smoke ...` on CPU; returns results.json."""
    env = {**os.environ, "IBRIDGE_CACHE": str(model_cache), "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    cmd = torchrun_command("-m", "ibridge", "train", "debug=smoke", "trainer.num_threads=1", "sft.max_steps=6",
                           "sft.log_every=2", "hydra.run.dir=run", *overrides)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((cwd / "run" / "results.json").read_text())


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, model_cache) -> Path:
    cwd = tmp_path_factory.mktemp("ddp")
    torchrun_train(cwd, model_cache, "trainer=ddp")
    return cwd / "run"


def test_two_process_ddp_train_stays_in_sync_and_writes_once(ddp_run):
    run = ddp_run
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


def test_two_process_fsdp_train_ends_where_ddp_does(tmp_path, model_cache, ddp_run):
    """FSDP (sharded parameters, gradients and AdamW state, mid-stage states saved) computes
    the same averaged gradients as DDP, so the same batches give the same weights."""
    results = torchrun_train(tmp_path, model_cache, "trainer=fsdp", "sft.save_every=2")
    sft = results["stages"]["sft"]
    assert results["status"] == "completed" and sft["distributed"] == "fsdp" and sft["world_size"] == 2
    first, second = sft["rank_checksums"]
    assert first == second
    assert "kl_token" in sft  # the held-out drift evaluation ran (a collective forward under FSDP)
    sharded = load_file(str(Path(sft["checkpoint"]) / "model.safetensors"))
    replicated = load_file(str(ddp_run / "sft" / "checkpoint" / "model.safetensors"))
    assert sharded.keys() == replicated.keys()  # same Hugging Face layout (tied weights saved once)
    for name, value in replicated.items():
        torch.testing.assert_close(sharded[name], value, rtol=0, atol=1e-6, msg=name)
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_process_deepspeed_zero_train_ends_where_ddp_does(tmp_path, model_cache, ddp_run, zero_stage):
    """DeepSpeed's engine (ZeRO-2: gradients and AdamW state partitioned; ZeRO-3: the weights
    too) around ibridge's loop, optimiser and schedule: DDP's weights from the same batches."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra (make setup-deepspeed; make test installs it)")
    results = torchrun_train(tmp_path, model_cache, "trainer=deepspeed",
                             f"trainer.deepspeed.zero_stage={zero_stage}")
    sft = results["stages"]["sft"]
    assert results["status"] == "completed" and sft["distributed"] == "deepspeed"
    assert sft["rank_checksums"][0] == sft["rank_checksums"][1] and "kl_token" in sft
    zero = load_file(str(Path(sft["checkpoint"]) / "model.safetensors"))
    replicated = load_file(str(ddp_run / "sft" / "checkpoint" / "model.safetensors"))
    assert zero.keys() == replicated.keys()
    for name, value in replicated.items():
        torch.testing.assert_close(zero[name], value, rtol=0, atol=1e-6, msg=name)


def test_accelerate_launch_runs_the_same_two_ranks(tmp_path, model_cache):
    """`accelerate launch --multi_gpu` starts torchrun underneath: ibridge needs nothing of its own."""
    env = {**os.environ, "IBRIDGE_CACHE": str(model_cache), "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "ibridge", "train", "debug=smoke", "trainer=ddp", "trainer.num_threads=1", "sft.max_steps=4",
           "sft.log_every=2", "hydra.run.dir=run"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sft = json.loads((tmp_path / "run" / "results.json").read_text())["stages"]["sft"]
    assert sft["world_size"] == 2 and sft["rank_checksums"][0] == sft["rank_checksums"][1]


def test_fsdp_training_state_resumes_exactly(tmp_path):
    """Sharded model and AdamW state, gathered, saved, re-sharded on resume: bit-identical."""
    run_worker("fsdp_state_worker.py", str(tmp_path), timeout=600)
    assert (tmp_path / "ok").is_file()
