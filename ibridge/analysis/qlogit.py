"""Logits as a Q-function: pure tensor/array functions (docs/design.md §1, "Logits as Q-function").

In the token MDP (state ``s_t = (x, a_<t)``, action ``a_t`` the next token), with raw logits
``l`` of the policy ``pi`` and of its reference ``pi_ref``:

- ``Q(s, a) = beta * (l_pi(s, a) - l_ref(s, a))``
- ``V(s) = beta * (logsumexp l_pi(s) - logsumexp l_ref(s))``
- identity 1, per token: ``beta * log pi(a|s) / pi_ref(a|s) = Q(s, a) - V(s)``
- per-token reward ``r_t = Q(s_t, a_t) - V(s_{t+1})``, with ``V = 0`` after the last
  response token (after EOS)
- identity 2, per sequence: ``sum_t r_t = r(x, y) + V(s_0)``, with
  ``r(x, y) = beta * sum_t log pi(a_t|s_t) / pi_ref(a_t|s_t)`` and ``s_0`` the state before
  the first response token.

The identities need the models' *full raw* logits (a Hugging Face causal LM's ``.logits``), not
log-probabilities; with log-softmax outputs ``V`` would be 0 and identity 1 trivially true.
Both models must share the tokenizer (the same action space).

Every per-token tensor here is aligned with :func:`ibridge.objectives.logprobs.token_logps`:
shape ``(B, T-1)``, position ``j`` holds the quantities of the action ``labels[:, j+1]`` taken
in the state ``input_ids[:, :j+1]``, and ``mask`` says where that action is a response token.
The per-token implicit reward (``beta * log-ratio``) goes through ``token_logps`` (log-softmax
picked at the label), ``Q`` and ``V`` straight from the logits, so the identities compare two
independent computations.

Precision: everything is computed in ``dtype`` (float64 by default) from the given logits, so
for float32 logits the identities hold to ~1e-12; the caller bounds the memory this costs
(``B * T * V`` elements of ``dtype``) through its batch size.

Invariance. A causal LM's logits at a state are defined only up to an additive constant:
adding ``c(s)`` to every logit of state ``s`` (of either model) changes no probability. Under
such a per-state offset ``Q(s, .)`` and ``V(s)`` both move by ``beta * c(s)`` and ``r_t`` by
``beta * (c(s_t) - c(s_{t+1}))``, so ``q``, ``v``, ``r_t``, ``v_start``, their sums and anything
ranked by them (the first-error AUROC of ``r_t``) describe the logits, not the policies. What
depends on the probabilities only — ``token_reward``, ``r(x, y)``, and what is computed from
them (:data:`OFFSET_INVARIANT`) — is invariant, and so are the identities themselves.

Masks with several response segments (multi-turn chats) are handled: each segment's last
token is followed by ``V = 0`` (the end of that assistant turn), and identity 2 then reads
``sum_t r_t = r(x, y) + sum over segment starts of V(s_start)``; for the usual single response
that is ``V(s_0)``. A response cut by ``max_length`` is treated as if it ended there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ibridge.evaluation.stats import auroc
from ibridge.objectives.logprobs import token_logps

__all__ = [
    "OFFSET_INVARIANT",
    "check_identities",
    "first_error_auroc",
    "first_error_targets",
    "position_matched_auroc",
    "position_only_auroc",
    "q_values",
    "sequence_values",
]

IGNORE_INDEX = -100

# The `qlogit` job's metrics that a per-state logit offset leaves unchanged (module docstring);
# `auroc_r_t*`, and the per-token `q`, `v`, `r_t` of tokens.jsonl, are not among them.
OFFSET_INVARIANT = (
    "identity_max_abs_error_token",
    "identity_max_abs_error_sequence",
    "auroc_token_reward",
    "auroc_token_reward_position_matched",
    "auroc_position_only",
    "implicit_reward_acc",
    "spearman_reward_gold",
    "mean_reward_chosen",
    "mean_reward_rejected",
)


def q_values(
    policy_logits: Tensor,
    ref_logits: Tensor,
    labels: Tensor,
    beta: float,
    dtype: torch.dtype = torch.float64,
) -> dict[str, Tensor]:
    """Per-token Q, V, implicit reward and ``r_t`` of the labelled (response) tokens.

    Args:
        policy_logits: (B, T, V) raw logits of ``pi`` over ``input_ids`` (B, T).
        ref_logits: (B, T, V) raw logits of ``pi_ref`` over the same ``input_ids``.
        labels: (B, T), ``labels[t] = input_ids[t]`` on response tokens, -100 elsewhere.
        beta: the KL coefficient (> 0).
        dtype: arithmetic dtype (float64 by default).

    Returns:
        A dict of tensors in ``dtype`` (``mask`` bool), all zero where ``mask`` is off:

        - per token, (B, T-1): ``q`` = Q(s_t, a_t); ``v`` = V(s_t); ``v_next`` = V(s_{t+1})
          (0 after the last token of a response segment); ``token_reward`` =
          ``beta * log pi(a_t|s_t) / pi_ref(a_t|s_t)``; ``r_t`` = ``q - v_next``; ``mask``.
        - per sequence, (B,): ``reward`` = r(x, y) (sum of ``token_reward``); ``r_sum`` = sum of
          ``r_t``; ``v_start`` = V(s_0) (summed over segment starts if there are several).
    """
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(
            f"policy logits {tuple(policy_logits.shape)} and reference logits {tuple(ref_logits.shape)} "
            "differ: the two models must share the tokenizer (vocabulary)"
        )
    if policy_logits.dim() != 3 or policy_logits.shape[:2] != labels.shape:
        raise ValueError(f"expected logits (B, T, V) and labels (B, T); got {tuple(policy_logits.shape)}, "
                         f"{tuple(labels.shape)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    lp = policy_logits.to(dtype)  # (B, T, V)
    lr = ref_logits.to(dtype)  # (B, T, V)
    logp_pi, mask = token_logps(lp, labels)  # (B, T-1), (B, T-1)
    logp_ref, _ = token_logps(lr, labels)  # (B, T-1)
    token_reward = beta * (logp_pi - logp_ref)  # (B, T-1)

    actions = labels[:, 1:].masked_fill(~mask, 0).unsqueeze(-1)  # (B, T-1, 1)
    q = beta * (lp[:, :-1].gather(-1, actions) - lr[:, :-1].gather(-1, actions)).squeeze(-1)  # (B, T-1)
    v = beta * (torch.logsumexp(lp[:, :-1], dim=-1) - torch.logsumexp(lr[:, :-1], dim=-1))  # (B, T-1)
    zero = torch.zeros((), dtype=dtype, device=q.device)
    q = torch.where(mask, q, zero)
    v = torch.where(mask, v, zero)

    # V(s_{t+1}): the next position's V where the next action is still a response token, else 0
    # (after EOS / the end of the segment).
    nxt = torch.zeros_like(mask)  # (B, T-1)
    nxt[:, :-1] = mask[:, :-1] & mask[:, 1:]
    v_next = torch.zeros_like(v)  # (B, T-1)
    v_next[:, :-1] = torch.where(nxt[:, :-1], v[:, 1:], zero)
    r_t = torch.where(mask, q - v_next, zero)  # (B, T-1)

    starts = mask.clone()  # (B, T-1): first token of each response segment
    starts[:, 1:] &= ~mask[:, :-1]
    return {
        "q": q,
        "v": v,
        "v_next": v_next,
        "token_reward": token_reward,
        "r_t": r_t,
        "mask": mask,
        "reward": token_reward.sum(-1),  # (B,)
        "r_sum": r_t.sum(-1),  # (B,)
        "v_start": torch.where(starts, v, zero).sum(-1),  # (B,)
    }


def check_identities(values: dict[str, Tensor]) -> tuple[float, float]:
    """Largest absolute errors of the two identities of docs/design.md §1 over ``values``.

    ``values`` is what :func:`q_values` returns. Returns ``(token, sequence)``:

    - token: ``max |beta * log pi/pi_ref - (Q - V)|`` over response tokens (identity 1);
    - sequence: ``max |sum_t r_t - (r(x, y) + V(s_0))|`` over sequences (identity 2).

    0.0 when there is nothing to check.
    """
    mask = values["mask"]
    token_err = (values["token_reward"] - (values["q"] - values["v"])).abs()[mask]
    seq_err = (values["r_sum"] - (values["reward"] + values["v_start"])).abs()
    return (
        float(token_err.max()) if token_err.numel() else 0.0,
        float(seq_err.max()) if seq_err.numel() else 0.0,
    )


def sequence_values(values: dict[str, Tensor], row: int) -> dict[str, list[float]]:
    """The response tokens' ``q``, ``v``, ``token_reward`` and ``r_t`` of one row, as lists."""
    mask = values["mask"][row]
    return {key: values[key][row][mask].tolist() for key in ("q", "v", "token_reward", "r_t")}


def first_error_targets(n_tokens: int, first_error: int | None) -> np.ndarray | None:
    """Labels for finding the first wrong token of one response of ``n_tokens`` tokens.

    Returns ``[0, ..., 0, 1]`` of length ``first_error + 1`` (the tokens up to and including
    the first wrong one; those after it are not judged), or None when the response has no
    error or its first error lies beyond its tokens (e.g. cut by ``max_length``).
    """
    if first_error is None or first_error < 0 or first_error >= n_tokens:
        return None
    targets = np.zeros(first_error + 1, dtype=float)
    targets[first_error] = 1.0
    return targets


def first_error_auroc(
    token_rewards: Sequence[Sequence[float]], first_errors: Sequence[int | None]
) -> tuple[float | None, int, int]:
    """AUROC of a per-token reward for finding the first wrong token of each response.

    Convention: the tokens considered are, for every response that has an error, its tokens
    up to and including the first wrong one; the positive class is "this token is the first
    wrong token", and the score is the *negative* reward (a lower per-token reward should flag
    the error). So 0.5 is chance, above 0.5 the reward drops at the error, below 0.5 it rises.

    Args:
        token_rewards: per response, the reward of each response token (in order).
        first_errors: per response, the index of its first wrong token (None if none).

    Returns:
        ``(auroc, n_positive, n_negative)``; auroc is None when one class is empty (e.g. every
        error is at the first token, or no response has an error).
    """
    scores, targets = [], []
    for rewards, first_error in zip(token_rewards, first_errors, strict=True):
        labels = first_error_targets(len(rewards), first_error)
        if labels is None:
            continue
        scores.append(-np.asarray(rewards[: len(labels)], dtype=float))
        targets.append(labels)
    if not targets:
        return None, 0, 0
    score = np.concatenate(scores)
    target = np.concatenate(targets)
    n_pos = int(target.sum())
    n_neg = int(target.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None, n_pos, n_neg
    return auroc(score, target), n_pos, n_neg


def position_only_auroc(n_tokens: Sequence[int], first_errors: Sequence[int | None]) -> float | None:
    """The first-error AUROC of a score that knows only the token's position (its index).

    Over the tokens :func:`first_error_auroc` considers, the positive is always the *last* one
    of its response, so a score that merely grows along the response already beats 0.5: this
    is the baseline a per-token reward has to beat before it says anything about errors.
    """
    positions = [[-float(j) for j in range(n)] for n in n_tokens]  # reward -j: score = j
    return first_error_auroc(positions, first_errors)[0]


def position_matched_auroc(
    token_rewards: Sequence[Sequence[float]], first_errors: Sequence[int | None]
) -> tuple[float | None, int]:
    """First-error AUROC that compares tokens at the same position only (stratified by position).

    For each position ``j``: positives are the responses whose first wrong token is ``j``,
    negatives those whose first wrong token comes later (token ``j`` is still right); the score
    is the negative reward at ``j``, as in :func:`first_error_auroc`. The per-position AUROCs are
    pooled with weights ``n_pos_j * n_neg_j``, i.e. this is the share of same-position
    (positive, negative) pairs ranked correctly (ties half). A reward that only drifts with
    position scores 0.5 here, however high its pooled AUROC.

    Returns ``(auroc, n_pairs)``; auroc is None when no position has both classes.
    """
    by_position: dict[int, tuple[list[float], list[float]]] = {}
    for rewards, first_error in zip(token_rewards, first_errors, strict=True):
        if first_error_targets(len(rewards), first_error) is None:
            continue
        for j in range(first_error + 1):
            scores, labels = by_position.setdefault(j, ([], []))
            scores.append(-float(rewards[j]))
            labels.append(float(j == first_error))
    total, weight = 0.0, 0
    for scores, labels in by_position.values():
        n_pos = int(sum(labels))
        pairs = n_pos * (len(labels) - n_pos)
        if pairs:
            total += pairs * auroc(np.asarray(scores), np.asarray(labels))
            weight += pairs
    return (total / weight if weight else None), weight
