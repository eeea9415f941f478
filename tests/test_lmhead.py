"""The chunked LM-head log-prob (ibridge/lmhead.py) against log_softmax of the full logits."""

import pytest
import torch
import torch.nn.functional as F

import ibridge.lmhead
from ibridge.lmhead import linear_label_logps, plain_head


def _inputs(n=37, hidden=16, vocab=101, bias=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(vocab, generator=g, dtype=dtype, requires_grad=True) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    weights = torch.randn(n, generator=g, dtype=dtype)  # a per-token weighting, as DPO or an f-divergence gives
    return h, w, b, targets, weights


def _reference(h, w, b, targets):
    return F.linear(h, w, b).log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_match_the_full_logits_in_chunks(bias, monkeypatch):
    monkeypatch.setattr(ibridge.lmhead, "CHUNK_ELEMENTS", 5 * 101)  # 5 rows a chunk: 8 chunks, the last short
    h, w, b, targets, weights = _inputs(bias=bias, dtype=torch.float32)
    got = linear_label_logps(h, w, b, targets)
    assert got.dtype == torch.float32
    grads = torch.autograd.grad((got * weights).sum(), [x for x in (h, w, b) if x is not None])
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    want = _reference(h64, w64, b64, targets)
    want_grads = torch.autograd.grad((want * weights.double()).sum(), [x for x in (h64, w64, b64) if x is not None])
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    for a, e in zip(grads, want_grads, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5)


def test_gradcheck_in_float64():
    h, w, b, targets, _ = _inputs(n=6, hidden=4, vocab=9)
    assert torch.autograd.gradcheck(lambda h, w, b: linear_label_logps(h, w, b, targets), (h, w, b))


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_the_softmax_in_float32():
    h, w, _, targets, _ = _inputs(bias=False, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_label_logps(h, w, None, targets)
        logits = F.linear(h, w)  # bf16 under autocast, as lm_head gives
    assert got.dtype == torch.float32 and logits.dtype == torch.bfloat16
    want = logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # same bf16 logits, same float32 softmax
    assert (got - _reference(h, w, None, targets)).abs().max() > 1e-4  # and not the float32 result


def test_bad_shapes_are_refused():
    h, w, b, targets, _ = _inputs()
    with pytest.raises(ValueError, match="expected"):
        linear_label_logps(h, w, b, targets[:-1])


def test_plain_head_only_for_families_whose_logits_are_the_head_of_the_last_state():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=2))
    assert plain_head(llama) is llama.lm_head
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2))
    assert plain_head(gpt2) is None
