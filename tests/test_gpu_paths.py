"""GPU code paths of issue 20, driven on the CPU: what a sharded model, a flash-attention run
or a bf16 runtime does differently, simulated as the GPU would run it."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ibridge.distributed import shard
from ibridge.objectives.logprobs import token_logps
from ibridge.packing import PackedForward, takes_logits_mask
from tests.one_rank import one_rank_group

CPU = torch.device("cpu")
CONFIG = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=64, attn_implementation="eager")


def batch(seed: int = 0, rows: int = 3, width: int = 12) -> dict:
    """Right-padded rows, a prompt of 4 unscored tokens each."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, CONFIG.vocab_size, (rows, width), generator=generator)
    lengths = torch.tensor([width - 3 * r for r in range(rows)])
    mask = (torch.arange(width) < lengths.unsqueeze(1)).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def test_an_fsdp2_sharded_model_gets_logits_at_scored_tokens_only():
    """``fully_shard`` replaces the model's class by ``FSDPLlamaForCausalLM``, defined in torch:
    `takes_logits_mask` must still find the modeling code's ``slice_logits_to_keep`` (issue 20,
    item 13), so that the head runs at the S scored tokens, not at all B x T positions."""
    torch.manual_seed(0)
    plain = LlamaForCausalLM(CONFIG)
    inputs = batch()
    expected, mask = token_logps(plain(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits,
                                 inputs["labels"])
    with one_rank_group() as info:
        model = shard(plain, info, CPU, "fp32")
        assert type(model).__name__ == "FSDPLlamaForCausalLM"
        assert takes_logits_mask(model)
        rows = []
        model.lm_head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[:-1].numel()))
        logps, scored = PackedForward(model, pack=False).scored_logps(**inputs)
    assert rows == [int(mask.sum())]  # the head saw the scored tokens only
    assert torch.equal(scored, mask)
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-6)


class RemoteCodeModel(LlamaForCausalLM):
    """Stands for modeling code outside transformers (``trust_remote_code``), in a module (this
    one) that does not slice with ``slice_logits_to_keep``."""


def test_the_logits_mask_check_reads_the_models_own_class_not_its_bases():
    """Looking through the MRO for FSDP2 must not make every model qualify through transformers'
    own base classes, which sit beside ``slice_logits_to_keep`` in transformers.modeling_utils."""
    from peft import LoraConfig, get_peft_model

    assert takes_logits_mask(get_peft_model(LlamaForCausalLM(CONFIG), LoraConfig(r=2, target_modules=["q_proj"])))
    assert not takes_logits_mask(RemoteCodeModel(CONFIG))
