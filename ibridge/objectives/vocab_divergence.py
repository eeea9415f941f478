"""Exact per-position KL between the policy's and the reference's next-token distributions.

The objectives that anchor with a full-vocabulary KL (``sft_kl``, ``asft``; docs/design.md §1's
``KL(pi || pi_ref)`` taken at each demonstration prefix ``s_t`` rather than only at the
demonstrated token) need, per scored position,

    policy_ref:  KL(pi(.|s_t) || pi_ref(.|s_t)) = sum_v p_v (log p_v - log q_v)
    ref_policy:  KL(pi_ref(.|s_t) || pi(.|s_t)) = sum_v q_v (log q_v - log p_v)

(``p = softmax(policy logits)``, ``q = softmax(reference logits)``), differentiable in the
policy's logits. Gradients with respect to the policy logit ``x_j`` (``k`` the row's KL):

    policy_ref:  p_j (log p_j - log q_j - k)
    ref_policy:  p_j - q_j

Memory, as in ``logprobs.py``: the usual ``F.kl_div(F.log_softmax(x.float()), ...)`` keeps
float32 ``(B, T, V)`` log-softmaxes of both models alive for the backward pass (two 2 GB
tensors for a batch of 4096 tokens at V = 128256). ``_VocabKL`` works on the scored rows only,
in float32 chunks of about 2**25 elements, and saves the policy logits (alive anyway as the
model's output), the reference logits *of the scored rows* in their own dtype, and three
``(N,)`` vectors; the softmaxes are recomputed chunk by chunk in the backward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ibridge.chunking import row_chunks

__all__ = ["KL_DIRECTIONS", "vocab_kl"]

#: ``policy_ref``: KL(pi || pi_ref), what docs/design.md §1's anchor and ``kl/token`` measure;
#: ``ref_policy``: KL(pi_ref || pi), what ASFT's released code computes (``F.kl_div(log p, q)``).
KL_DIRECTIONS = ("policy_ref", "ref_policy")

# Rows handled at once: about 2**25 float32 elements (128 MiB) per temporary, whatever V.
_CHUNK_ELEMENTS = 2**25


class _VocabKL(torch.autograd.Function):
    """Row KL of the policy logits at flat row indices ``rows`` against fixed reference rows."""

    @staticmethod
    def forward(ctx, logits: Tensor, ref_rows: Tensor, rows: Tensor, direction: str) -> Tensor:
        # logits (..., V) policy, any float dtype; ref_rows (N, V) reference logits at `rows`;
        # rows (N,) int64 indices into the flattened leading dims of `logits`, distinct.
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)  # (M, V): a view for the model's contiguous output
        dtype = torch.promote_types(logits.dtype, torch.float32)
        n = rows.numel()
        kl = torch.empty(n, dtype=dtype, device=logits.device)  # (N,)
        lse_p = torch.empty(n, dtype=dtype, device=logits.device)  # (N,)
        lse_q = torch.empty(n, dtype=dtype, device=logits.device)  # (N,)
        for part in row_chunks(n, vocab, _CHUNK_ELEMENTS):
            # in-place arithmetic: each chunk holds two (n, V) float32 temporaries at a time
            logp = flat.index_select(0, rows[part]).to(dtype)  # (n, V) policy logits
            logq = ref_rows[part].to(dtype, copy=True)  # (n, V) reference logits (a copy: edited in place)
            lse_p[part] = torch.logsumexp(logp, dim=-1)
            lse_q[part] = torch.logsumexp(logq, dim=-1)
            logp.sub_(lse_p[part].unsqueeze(-1))
            logq.sub_(lse_q[part].unsqueeze(-1))
            if direction == "policy_ref":  # sum p (log p - log q)
                weight, logq = logp.exp(), logq.neg_().add_(logp)
            else:  # sum q (log q - log p)
                weight, logq = logq.exp(), logq.sub_(logp)
            kl[part] = torch.linalg.vecdot(weight, logq)
            del logp, logq, weight
        ctx.direction = direction
        ctx.save_for_backward(logits, ref_rows, rows, lse_p, lse_q, kl)
        return kl

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, ref_rows, rows, lse_p, lse_q, kl = ctx.saved_tensors
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)  # (M, V)
        grad_logits = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
        flat_grad = grad_logits.view(-1, vocab)  # (M, V)
        go = grad_out.to(kl.dtype)  # (N,)
        for part in row_chunks(rows.numel(), vocab, _CHUNK_ELEMENTS):
            index = rows[part]
            logp = flat.index_select(0, index).to(kl.dtype).sub_(lse_p[part].unsqueeze(-1))  # (n, V)
            logq = ref_rows[part].to(kl.dtype, copy=True).sub_(lse_q[part].unsqueeze(-1))  # (n, V)
            p = logp.exp()
            if ctx.direction == "policy_ref":  # p (log p - log q - KL)
                g = p.mul_(logp.sub_(logq).sub_(kl[part].unsqueeze(-1)))
            else:  # p - q
                g = p.sub_(logq.exp_())
            g.mul_(go[part].unsqueeze(-1))
            flat_grad.index_copy_(0, index, g.to(flat_grad.dtype))
            del logp, logq, p, g
        return grad_logits, None, None, None


def vocab_kl(logits: Tensor, ref_logits: Tensor, where: Tensor, direction: str = "policy_ref") -> Tensor:
    """Exact KL over the vocabulary at each position where ``where`` is True (pure function).

    Args:
        logits: (..., V) policy logits, differentiable; any float dtype (arithmetic in float32,
            float64 stays float64).
        ref_logits: (..., V) reference logits, same shape; treated as fixed (no gradient).
        where: (...) bool, the positions to compute (e.g. demonstration prefixes).
        direction: ``policy_ref`` for KL(pi || pi_ref) or ``ref_policy`` for KL(pi_ref || pi).

    Returns:
        (...) float32 (float64 for float64 logits): the KL at each selected position, 0 elsewhere
        (and no gradient there).
    """
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"vocab_kl: direction must be one of {', '.join(KL_DIRECTIONS)}; got {direction!r}")
    if logits.shape != ref_logits.shape or where.shape != logits.shape[:-1]:
        raise ValueError(
            f"vocab_kl: expected logits and ref_logits of one shape (..., V) and where (...); got "
            f"{tuple(logits.shape)}, {tuple(ref_logits.shape)} and {tuple(where.shape)}"
        )
    if where.dtype != torch.bool:
        raise ValueError(f"vocab_kl: where must be a bool tensor, got {where.dtype}")
    vocab = logits.shape[-1]
    rows = where.reshape(-1).nonzero().squeeze(-1)  # (N,) flat indices of the selected positions
    # Only the selected rows of the reference are kept (for the backward pass): the caller's
    # full (..., V) reference logits can be freed as soon as this returns.
    ref_rows = ref_logits.detach().reshape(-1, vocab).index_select(0, rows)  # (N, V)
    kl_rows = _VocabKL.apply(logits, ref_rows, rows, direction)  # (N,)
    out = torch.zeros(where.numel(), dtype=kl_rows.dtype, device=logits.device)
    return out.scatter(0, rows, kl_rows).view(where.shape)
