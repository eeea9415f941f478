"""Padding-free packing in the training loop gives the padded forward's loss and gradients."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ibridge.objectives.logprobs import token_logps
from ibridge.training import PackedForward, pack_plan


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, attn_implementation="eager")
    return LlamaForCausalLM(config)


def _batch(lengths, width):
    torch.manual_seed(1)
    ids = torch.randint(1, 32, (len(lengths), width))
    mask = (torch.arange(width) < torch.tensor(lengths).unsqueeze(1)).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # an unlabelled "prompt"
    return ids.masked_fill(mask == 0, 0), mask, labels


def _loss_and_grads(model, forward, ids, mask, labels):
    model.zero_grad()
    logps, scored = token_logps(forward(input_ids=ids, attention_mask=mask).logits, labels)
    loss = -(logps.sum() / scored.sum())
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_packed_forward_matches_the_padded_forward():
    model = _model()
    ids, mask, labels = _batch([12, 5, 3, 9, 4, 12, 6, 2], 12)
    assert pack_plan(mask) is not None  # this batch does get packed
    loss, grads = _loss_and_grads(model, model, ids, mask, labels)
    packed_loss, packed_grads = _loss_and_grads(model, PackedForward(model), ids, mask, labels)
    torch.testing.assert_close(packed_loss, loss, rtol=0, atol=1e-6)
    for a, b in zip(packed_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_pack_plan_declines_left_padding_and_batches_without_padding():
    assert pack_plan(torch.tensor([[0, 1, 1], [1, 1, 1]])) is None  # left padding
    assert pack_plan(torch.ones(4, 10, dtype=torch.long)) is None  # nothing to save
