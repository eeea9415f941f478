"""Log-probabilities of labels through the LM head without materialising the logits.

A training step needs ``log pi(a_t | s_t)`` at scored tokens only (docs/design.md §1). The usual
route, ``logits = lm_head(hidden)`` then a log-softmax, holds an ``(S, V)`` tensor for the
backward pass plus its gradient: at Llama-3's 128,256-token vocabulary that is 0.5 GB per
thousand scored tokens in float32, more than the activations of a small model
(docs/memory.md). `linear_label_logps` computes ``h @ W.T`` in row chunks, keeps only each
row's log-partition, and recomputes each chunk in the backward pass: one more matmul of the
head (about a third more head time) for no ``(S, V)`` memory. Liger's fused linear cross
entropy and TRL's fused LM head do the same; this one also serves objectives that weight
each token's log-prob differently (the f-divergences, DPO), since its input gradient is per
token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ibridge.chunking import row_chunks

# Rows of each chunk: about 2**24 logits (64 MiB in float32) at a time, whatever the vocabulary.
CHUNK_ELEMENTS = 2**24
# Model families whose logits are exactly ``lm_head(last_hidden_state)`` (no soft-capping,
# scaling or bias tricks between them), so the head can be applied outside the model.
FUSED_HEAD_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})


class _LinearLabelLogProb(torch.autograd.Function):
    """``log_softmax(h @ W.T + b)[target]`` per row, float32 (or float64) arithmetic, no saved (S, V) tensor."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, dtype: torch.dtype):
        # hidden (S, H), weight (V, H), bias (V,) or None, targets (S,) int64; matmuls in `dtype`
        vocab = weight.shape[0]
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        acc = torch.promote_types(dtype, torch.float32)  # float32 at least; float64 stays float64 (gradcheck)
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)  # (S,)
        lse = torch.empty_like(out)  # (S,)
        with torch.autocast(hidden.device.type, enabled=False):
            for rows in row_chunks(hidden.shape[0], vocab, CHUNK_ELEMENTS):
                logits = F.linear(hidden[rows].to(dtype), w, b).to(acc)  # (n, V)
                lse[rows] = torch.logsumexp(logits, dim=-1)
                out[rows] = logits.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1) - lse[rows]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.dtype = dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype, vocab = ctx.dtype, weight.shape[0]
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        acc = lse.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) if need_b and bias is not None else None
        grad_out = grad_out.to(acc)
        with torch.autocast(hidden.device.type, enabled=False):
            for rows in row_chunks(hidden.shape[0], vocab, CHUNK_ELEMENTS):
                h = hidden[rows].to(dtype)  # (n, H)
                go = grad_out[rows].unsqueeze(-1)  # (n, 1)
                # d/dz_j (z_target - lse) = 1[j = target] - softmax(z)_j, times the incoming gradient
                g = torch.exp(F.linear(h, w, b).to(acc) - lse[rows].unsqueeze(-1)).mul_(-go)  # (n, V)
                g.scatter_add_(-1, targets[rows].unsqueeze(-1), go)
                if grad_b is not None:
                    grad_b += g.sum(0)
                g = g.to(dtype)
                if grad_h is not None:
                    grad_h[rows] = (g @ w).to(hidden.dtype)  # (n, H)
                if grad_w is not None:
                    if dtype == acc:
                        grad_w.addmm_(g.t(), h)  # (V, H)
                    else:
                        grad_w += (g.t() @ h).to(acc)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None)


def linear_label_logps(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> Tensor:
    """``log_softmax(hidden @ weight.T + bias)`` at ``targets``: (S, H), (V, H), (V,) or None, (S,) -> (S,).

    The matmuls run in the autocast dtype when autocast is on (as ``lm_head`` would), else in
    the hidden states' dtype; the log-softmax and the result are float32 (float64 for float64
    inputs), as in ``ibridge.objectives.logprobs`` (docs/design.md §4).
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"linear_label_logps: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
                         f"targets {tuple(targets.shape)}; expected (S, H), (V, H), (S,)")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return _LinearLabelLogProb.apply(hidden, weight, bias, targets.long(), dtype)


def plain_head(model) -> torch.nn.Linear | None:
    """The output layer, when the logits are exactly ``head(last_hidden_state)``; else None.

    None for other families (soft-capped or scaled logits), and for a head wrapped by an adapter
    (a LoRA on ``lm_head``), whose weight alone is not the layer.
    """
    base = getattr(model, "module", model)  # DDP's module
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in FUSED_HEAD_MODEL_TYPES:
        return None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return head if type(head) is torch.nn.Linear else None
