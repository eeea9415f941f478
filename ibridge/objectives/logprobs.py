"""Per-token log-probabilities of labelled tokens, kept apart from the losses (docs/design.md §4).

The objectives of docs/design.md §1 only ever need ``log pi(a_t | s_t)`` at the demonstration's (or
response's) own tokens, so this module turns a causal LM's logits into exactly that and nothing
more: shift by one, ``-100`` masking, float32 arithmetic.

Memory: the usual ``logits.float().log_softmax(-1).gather(...)`` keeps a float32 copy of the whole
``(B, T, V)`` tensor alive for the backward pass (``F.cross_entropy`` does the same internally),
which for a 128k vocabulary is larger than the bf16 logits themselves. ``_LabelLogProb`` below
computes ``logit[label] - logsumexp(logits)`` in float32 chunk by chunk, saves only the input
logits (already alive as the model's output) and the ``(N,)`` log-partition, and recomputes the
softmax chunk by chunk in the backward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ibridge.chunking import row_chunks

__all__ = ["token_logps", "sequence_logps", "label_logps"]

# Rows of the flattened (N, V) logits handled at once: about 2**25 float32 elements (128 MiB)
# of temporary memory per chunk, whatever the vocabulary size.
_CHUNK_ELEMENTS = 2**25


def _compute_dtype(logits: Tensor) -> torch.dtype:
    # float32 at least (bf16/fp16 log-probs are too coarse for differences of sequence sums,
    # which is what implicit rewards are); float64 stays float64 (gradcheck, analysis).
    return torch.promote_types(logits.dtype, torch.float32)


class _LabelLogProb(torch.autograd.Function):
    """``log softmax(logits)[target]`` in float32 without a saved (N, V) float32 copy."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        # logits (..., V) any float dtype; targets (...) int64, all valid indices
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)  # (N, V): a view when logits are contiguous (lm_head output)
        flat_targets = targets.reshape(-1, 1)  # (N, 1)
        n_rows = flat.shape[0]
        dtype = _compute_dtype(logits)
        out = torch.empty(n_rows, dtype=dtype, device=logits.device)  # (N,)
        lse = torch.empty(n_rows, dtype=dtype, device=logits.device)  # (N,)
        for rows in row_chunks(n_rows, vocab, _CHUNK_ELEMENTS):
            x = flat[rows].to(dtype)  # (n, V)
            lse[rows] = torch.logsumexp(x, dim=-1)
            out[rows] = x.gather(-1, flat_targets[rows]).squeeze(-1) - lse[rows]
        ctx.save_for_backward(logits, targets, lse)
        return out.reshape(targets.shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, targets, lse = ctx.saved_tensors
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)  # (N, V)
        flat_targets = targets.reshape(-1, 1)  # (N, 1)
        flat_grad_out = grad_out.reshape(-1, 1).to(lse.dtype)  # (N, 1)
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        flat_grad = grad_logits.view(-1, vocab)  # (N, V)
        for rows in row_chunks(flat.shape[0], vocab, _CHUNK_ELEMENTS):
            # d/dx_j (x_target - lse) = 1[j = target] - softmax(x)_j
            go = flat_grad_out[rows]  # (n, 1)
            g = torch.exp(flat[rows].to(lse.dtype) - lse[rows].unsqueeze(-1)).mul_(-go)  # (n, V)
            g.scatter_add_(-1, flat_targets[rows], go)
            flat_grad[rows] = g.to(flat_grad.dtype)
        return grad_logits, None


def label_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """``log softmax(logits, -1)`` picked at ``targets``, in float32, for any leading shape.

    ``logits`` (..., V), ``targets`` (...) with valid indices only (no ignore value here).
    Returns (...) float32 (float64 for float64 logits). No shift: ``targets`` must already be aligned with ``logits``.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"label_logps: logits {tuple(logits.shape)} vs targets {tuple(targets.shape)}")
    return _LabelLogProb.apply(logits, targets.long())


def token_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Log-probability of each labelled token under a causal LM (docs/design.md §1, ``log pi(a_t|s_t)``).

    Args:
        logits: (B, T, V) from a causal LM run over ``input_ids`` (B, T); any float dtype
            (bf16 is fine: the arithmetic is float32).
        labels: (B, T) aligned with ``input_ids`` (Hugging Face convention: ``labels[t] =
            input_ids[t]``, ``ignore_index`` where the token is not scored, e.g. the prompt).
        ignore_index: label value of unscored positions.

    Returns:
        ``(logps, mask)``: logps (B, T-1) float32 (float64 for float64 logits), ``log pi(labels[t+1] | input_ids[:t+1])``,
        0.0 where masked; mask (B, T-1) bool, True where scored. Position ``t``'s logits
        predict token ``t + 1``, hence the shift.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"token_logps expects logits (B, T, V) and labels (B, T); got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    # Shift the labels, not the logits: slicing logits[:, :-1] and flattening would copy the
    # whole (B, T-1, V) tensor. The last position predicts nothing and gets a dummy target.
    tail = labels.new_full((labels.shape[0], 1), ignore_index)  # (B, 1)
    targets = torch.cat([labels[:, 1:], tail], dim=1)  # (B, T): targets[t] = labels[t+1]
    mask = targets != ignore_index  # (B, T)
    safe_targets = targets.masked_fill(~mask, 0)  # (B, T): dummy index 0 keeps gather in range
    logps = label_logps(logits, safe_targets)  # (B, T)
    logps = logps.masked_fill(~mask, 0.0)[:, :-1]  # (B, T-1)
    return logps, mask[:, :-1]


def sequence_logps(logps: Tensor, mask: Tensor) -> Tensor:
    """``log pi(y|x) = sum_t log pi(a_t|s_t)`` over scored tokens (docs/design.md §1).

    logps (B, T), mask (B, T) bool → (B,).
    """
    return torch.where(mask, logps, torch.zeros_like(logps)).sum(dim=-1)
