"""Run by tests/test_distributed.py under torchrun (2 CPU ranks, gloo); not a test module.

An FSDP-sharded training state saved after 2 steps and resumed into a freshly sharded
model must give exactly the weights of training 4 steps straight through; on resume only
rank 0 reads the state's tensor files (the others get their shards broadcast: 8 ranks each
reading the whole 96 GB state of an 8B model would exceed a node's memory).
Usage: torchrun --nproc_per_node 2 tests/fsdp_state_worker.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import ibridge.checkpointing as checkpointing
from ibridge.checkpointing import load_state, save_state
from ibridge.distributed import DistInfo, full_model_state, shard

CONFIG = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, attn_implementation="eager")


def build(info: DistInfo):
    torch.manual_seed(0)
    model = shard(LlamaForCausalLM(CONFIG), info, torch.device("cpu"), "fp32")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def train(model, optimizer, scheduler, steps: range, rank: int) -> None:
    for step in steps:
        generator = torch.Generator().manual_seed(100 * step + rank)  # each rank its own batch
        ids = torch.randint(0, CONFIG.vocab_size, (4, 12), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), mode="fsdp")
    model, optimizer, scheduler = build(info)
    initial = full_model_state(model, info)
    train(model, optimizer, scheduler, range(0, 2), info.rank)
    save_state(out / "state", model, optimizer, scheduler, 2, {}, sharded=True, write=info.is_main)
    dist.barrier()
    train(model, optimizer, scheduler, range(2, 4), info.rank)
    straight = full_model_state(model, info)

    model, optimizer, scheduler = build(info)
    reads: list[str] = []
    original_load_file = checkpointing.load_file

    def counting_load_file(path, *args, **kwargs):
        reads.append(Path(path).name)
        return original_load_file(path, *args, **kwargs)

    checkpointing.load_file = counting_load_file
    try:
        payload = load_state(out / "state", model, optimizer, scheduler, sharded=True)
    finally:
        checkpointing.load_file = original_load_file
    expected_reads = ["model.safetensors", "optimizer.safetensors"] if info.is_main else []
    assert sorted(reads) == expected_reads, f"rank {info.rank} read {reads}"
    train(model, optimizer, scheduler, range(2, 4), info.rank)
    resumed = full_model_state(model, info)
    if info.is_main:
        assert payload["step"] == 2
        assert any(not torch.equal(initial[k], straight[k]) for k in initial), "training changed nothing"
        worst = max(float((straight[k] - resumed[k]).abs().max()) for k in straight)
        assert worst == 0.0, f"resumed weights differ from straight-through ones by up to {worst}"
        (out / "ok").write_text(f"{len(straight)} tensors equal\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
