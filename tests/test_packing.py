"""Padding-free packing in the training loop gives the padded forward's loss and gradients."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ibridge.objectives.logprobs import token_logps
from ibridge.packing import PackedForward, pack_plan


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



def test_the_training_loop_packs_the_toy_model_and_trains_the_same(model_cache, monkeypatch):
    """A stage's loop really runs packed on the toy model, and lands where the padded loop does."""
    from ibridge.data import source_for
    from ibridge.data.collate import collate_demonstrations
    from ibridge.data.formatting import encode_split
    from ibridge.models import ensure_toy_base, load_model, load_tokenizer
    from ibridge.objectives import build_objective
    from ibridge.packing import packing_supported
    from ibridge.runtime import resolve_runtime
    from ibridge.stages import demonstration_step
    from ibridge.training import OptimSettings, optimise
    from tests.conftest import compose_config

    cfg = compose_config(["debug=smoke", f"model.cache_dir={model_cache}", "trainer=cpu"])
    runtime = resolve_runtime(cfg.trainer)
    source = source_for(cfg.data)
    base = ensure_toy_base(cfg.model, source.world_config, runtime)
    tokenizer = load_tokenizer(base)
    encoded, _ = encode_split(tokenizer, source.examples("demonstrations")[:64], "demonstrations", 48)
    step = demonstration_step(build_objective({"name": "sft"}))
    import ibridge.packing

    calls = {"packed": 0}

    def counting_plan(mask, factor):  # the loop's forward asks for a plan; count the packed ones
        plan = pack_plan(mask, factor)
        calls["packed"] += plan is not None
        return plan

    monkeypatch.setattr(ibridge.packing, "pack_plan", counting_plan)
    finals = {}
    for pack in (False, True):
        model = load_model(base, runtime)
        assert packing_supported(model, runtime)
        before = [p.detach().clone() for p in model.parameters()]
        settings = OptimSettings(lr=1e-3, batch_size=16, max_steps=8, log_every=4, pack_sequences=pack)
        calls["packed"] = 0
        optimise(model, encoded, lambda items: collate_demonstrations(items, tokenizer.pad_token_id),
                 step, settings, runtime)
        assert (calls["packed"] > 0) == pack  # packed batches only when packing is on
        finals[pack] = [p.detach().clone() for p in model.parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(before, finals[pack], strict=True))  # it trained
    for packed, padded in zip(finals[True], finals[False], strict=True):
        torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
