"""How far apart packed and padded pretraining of the toy base drift: max |ΔW| by step.

    python benchmarks/packing_divergence.py [--steps 400]

Two copies of the toy base's initial model train on identical batches of the world's
pretraining corpus with the same AdamW settings (clipping at 1.0); one runs the
padded forward, the other `ibridge.packing.PackedForward`. Their per-step gradients
agree to float rounding (tests/test_packing.py), yet the printed weight distance
grows by orders of magnitude: the pretraining trajectory is chaotic, so packing
changes which base model a given seed produces (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import copy

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from ibridge.cli import CONF_DIR
from ibridge.data import source_for
from ibridge.models import causal_lm_loss, collate_corpus, corpus_item
from ibridge.packing import PackedForward
from ibridge.runtime import seed_everything
from ibridge.world import build_tokenizer, build_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config")
    world_config = source_for(cfg.data).world_config
    seed_everything(world_config.seed)
    world, tokenizer = build_world(world_config), build_tokenizer(world_config)
    arch = OmegaConf.to_container(cfg.model.architecture, resolve=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=arch["hidden_size"],
                         intermediate_size=arch["intermediate_size"], num_hidden_layers=arch["num_hidden_layers"],
                         num_attention_heads=arch["num_attention_heads"],
                         max_position_embeddings=arch["max_position_embeddings"], tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, attn_implementation="eager")
    padded = LlamaForCausalLM(config)
    packed = copy.deepcopy(padded)
    items = [corpus_item(tokenizer, line, int(cfg.model.max_length)) for line in world.corpus]
    pre = cfg.model.pretrain
    optimizers = [torch.optim.AdamW(m.parameters(), lr=float(pre.lr), weight_decay=float(pre.weight_decay))
                  for m in (padded, packed)]
    forwards = [padded, PackedForward(packed)]
    order = torch.Generator().manual_seed(0)
    print(f"toy base, lr {float(pre.lr)}, batch {int(pre.batch_size)}, {args.steps} steps (fp32, eager, CPU)")
    print(" step  max|W_packed - W_padded|")
    for step in range(1, args.steps + 1):
        indices = torch.randperm(len(items), generator=order)[: int(pre.batch_size)].tolist()
        batch = collate_corpus([items[i] for i in indices], tokenizer.pad_token_id)
        for model, forward, optimizer in zip((padded, packed), forwards, optimizers, strict=True):
            causal_lm_loss(forward, batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if step in (1, 10, 50, 100, 200, 400, 800) or step == args.steps:
            with torch.no_grad():
                gap = max(float((p - q).abs().max()) for p, q in zip(padded.parameters(), packed.parameters(), strict=True))
            print(f"{step:5d}  {gap:.2e}")


if __name__ == "__main__":
    main()
