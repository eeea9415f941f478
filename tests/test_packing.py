"""Padding-free packing and the scored-token head give the padded forward's loss and gradients,
on every attention path and model family that packs on this CPU."""

import logging
import shutil

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import ibridge.packing
from ibridge.objectives.logprobs import token_logps
from ibridge.packing import PackedForward, pack_plan, packing_layout, scored_logps

FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM)}


def _model(attn="eager", family="llama", vocab=32):
    torch.manual_seed(0)
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        attn_implementation=attn, tie_word_embeddings=False)
    return model_cls(config)


def _batch(lengths, width, vocab=32):
    torch.manual_seed(1)
    ids = torch.randint(1, vocab, (len(lengths), width))
    mask = (torch.arange(width) < torch.tensor(lengths).unsqueeze(1)).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # an unlabelled "prompt"
    return ids.masked_fill(mask == 0, 0), mask, labels


def _loss_and_grads(model, logps_of, ids, mask, labels):
    model.zero_grad()
    logps, scored = logps_of(ids, mask, labels)
    loss = -(logps.sum() / scored.sum())
    loss.backward()
    return loss.detach(), logps.detach(), [p.grad.clone() for p in model.parameters()]


def _padded(model):
    return lambda ids, mask, labels: token_logps(model(input_ids=ids, attention_mask=mask).logits, labels)


def _assert_same(got, want):
    loss, logps, grads = got
    torch.testing.assert_close(loss, want[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(logps, want[1], rtol=0, atol=2e-6)
    for a, b in zip(grads, want[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


LENGTHS = [12, 5, 3, 9, 4, 12, 6, 2]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_forward_matches_the_padded_forward(attn, family, monkeypatch):
    """Packed logits (pretraining's path) and packed scored log-probs, with the model's head on
    scored tokens only and with the chunked head, against the plain padded forward."""
    model = _model(attn, family)
    ids, mask, labels = _batch(LENGTHS, 12)
    assert pack_plan(mask) is not None  # this batch does get packed
    packed = PackedForward(model, fused_head=True)
    assert packed.layout == "rows"
    want = _loss_and_grads(model, _padded(model), ids, mask, labels)
    _assert_same(_loss_and_grads(model, _padded(packed), ids, mask, labels), want)
    _assert_same(_loss_and_grads(model, packed.scored_logps, ids, mask, labels), want)
    monkeypatch.setattr(ibridge.packing, "FUSED_HEAD_BYTES", 0)  # every batch through ibridge/lmhead.py
    _assert_same(_loss_and_grads(model, packed.scored_logps, ids, mask, labels), want)
    unpacked = PackedForward(model, pack=False, fused_head=True)  # the scored head alone, padded
    _assert_same(_loss_and_grads(model, unpacked.scored_logps, ids, mask, labels), want)


def test_one_row_layout_matches_the_padded_forward():
    """Layout `row` (flash and flex kernels): every sequence in one row, each counting from 0."""
    model = _model("sdpa")
    ids, mask, labels = _batch(LENGTHS, 12)
    plan = pack_plan(mask, layout="row")
    assert plan["rows"] == 1 and plan["width"] == sum(LENGTHS)
    assert (plan["positions"] == 0).sum() == len(LENGTHS)  # one start per sequence, no row padding
    packed = PackedForward(model)
    packed.layout = "row"
    _assert_same(_loss_and_grads(model, packed.scored_logps, ids, mask, labels),
                 _loss_and_grads(model, _padded(model), ids, mask, labels))


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="flex_attention compiles C++ on the CPU")
def test_flex_attention_packs_in_one_row_forward_only():
    """flex_attention runs on this CPU forward-only (torch: no flex backward on CPU) after a
    ~30 s compile; its packed log-probs equal the padded eager forward's. Gradients: the GPU check."""
    torch._dynamo.reset()
    model = _model("flex_attention")
    assert packing_layout(model) == "row"
    ids, mask, labels = _batch(LENGTHS, 12)
    with torch.no_grad():
        got, scored = PackedForward(model).scored_logps(ids, mask, labels)
        model.config._attn_implementation = "eager"
        want, want_scored = token_logps(model(input_ids=ids, attention_mask=mask).logits, labels)
    assert torch.equal(scored, want_scored)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_scored_logps_saves_logits_at_scored_tokens_only(monkeypatch):
    """What autograd keeps for the backward pass: with the model's head, logits at scored tokens
    (S x V), not the padded batch's (B x T x V); with the chunked head, no (S, V) tensor at all."""
    vocab = 512
    model = _model("eager", vocab=vocab)
    ids, mask, labels = _batch(LENGTHS, 12, vocab)
    n_scored = int((labels[:, 1:] != -100).sum())

    def largest_saved(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn(ids, mask, labels)
        return max(sizes)

    weights = max(p.numel() for p in model.parameters())  # the head's (V, H) weight is saved too
    packed = PackedForward(model, fused_head=True)
    assert largest_saved(_padded(model)) >= ids.numel() * vocab  # the padded forward keeps (B, T, V)
    assert largest_saved(packed.scored_logps) == max(n_scored * vocab, weights)
    monkeypatch.setattr(ibridge.packing, "FUSED_HEAD_BYTES", 0)
    assert n_scored * vocab > weights
    assert largest_saved(packed.scored_logps) < n_scored * vocab


def test_scored_logps_without_the_wrapper_is_the_padded_forward():
    model = _model()
    ids, mask, labels = _batch(LENGTHS, 12)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        got = scored_logps(model, batch)
        want = token_logps(model(input_ids=ids, attention_mask=mask).logits, labels)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_pack_plan_declines_left_padding_and_batches_without_padding():
    assert pack_plan(torch.tensor([[0, 1, 1], [1, 1, 1]])) is None  # left padding
    assert pack_plan(torch.ones(4, 10, dtype=torch.long)) is None  # nothing to save


def test_paths_that_cannot_pack_say_so_once(caplog):
    ibridge.packing._said.clear()
    model = _model("eager")
    assert packing_layout(model) == "rows"
    model.config._attn_implementation = "flash_attention_2"  # not loadable on CPU; the layout only
    assert packing_layout(model) == "row"
    model.config._attn_implementation = "paged|sdpa"
    with caplog.at_level(logging.WARNING, logger="ibridge.packing"):
        assert packing_layout(model) is None
        assert packing_layout(model) is None
        assert PackedForward(model).layout is None
    said = [r.message for r in caplog.records]
    assert len(said) == 1 and "'paged|sdpa'" in said[0] and "padded" in said[0]
    ids, mask, labels = _batch(LENGTHS, 12)
    model.config._attn_implementation = "eager"
    forward = PackedForward(model)
    forward.layout = None  # what a path that cannot pack gets: the padded forward, unchanged
    with torch.no_grad():
        assert torch.equal(forward(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)


def test_the_training_loop_packs_the_toy_model_and_trains_the_same(model_cache, monkeypatch):
    """A stage's loop really runs packed on the toy model, and lands where the padded loop does."""
    from ibridge.data import source_for
    from ibridge.data.collate import collate_demonstrations
    from ibridge.data.formatting import encode_split
    from ibridge.models import ensure_toy_base, load_model, load_tokenizer
    from ibridge.objectives import build_objective
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

    calls = {"packed": 0}

    def counting_plan(mask, factor, layout):  # the loop's forward asks for a plan; count the packed ones
        plan = pack_plan(mask, factor, layout)
        calls["packed"] += plan is not None
        return plan

    monkeypatch.setattr(ibridge.packing, "pack_plan", counting_plan)
    finals = {}
    for pack in (False, True):
        model = load_model(base, runtime)
        assert packing_layout(model) == "rows"
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


@pytest.mark.slow
def test_two_ddp_ranks_packed_with_the_chunked_head_have_the_one_batch_gradient(tmp_path):
    """Under DDP the chunked head uses the head's weight outside the model's forward: its
    gradient must still reach the all-reduce (tests/packing_ddp_worker.py)."""
    import json

    from tests.torchrun import run_worker

    out = tmp_path / "report.json"
    run_worker("packing_ddp_worker.py", str(out))
    report = json.loads(out.read_text())
    for kind, diffs in report.items():
        assert diffs["ddp"] and diffs["packed_batches"] > 0, (kind, diffs)
        assert diffs["grad_diff"] <= 1e-4 * diffs["grad_scale"] + 1e-6, (kind, diffs)


def test_auto_attention_prefers_the_kernels_that_pack_without_a_mask(monkeypatch):
    import transformers.utils

    from ibridge.runtime import auto_attention

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert auto_attention(cuda, "bf16") == "flash_attention_2"
    assert auto_attention(cuda, "fp32") == "sdpa"  # flash kernels are half precision only
    assert auto_attention(cpu, "fp32") == "eager"
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    assert auto_attention(cuda, "bf16") == "sdpa"


def test_models_without_a_logits_mask_get_the_whole_logits():
    """Modeling code that cannot take ``logits_to_keep`` as a mask is scored from its whole (packed)
    logits, with the same result, and never through the chunked head."""
    from ibridge.packing import takes_logits_mask

    model = _model()
    assert takes_logits_mask(model) and not takes_logits_mask(torch.nn.Linear(2, 2))
    ids, mask, labels = _batch(LENGTHS, 12)
    want = _loss_and_grads(model, _padded(model), ids, mask, labels)
    forward = PackedForward(model, fused_head=True)
    forward.logits_mask, forward.fused_head = False, False  # what __init__ sets for such a model
    _assert_same(_loss_and_grads(model, forward.scored_logps, ids, mask, labels), want)
