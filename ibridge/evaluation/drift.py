"""Drift from the reference and implicit-reward accuracy (docs/design.md §1, §3).

- `kl/token`: mean over demonstration prefixes s of KL(pi(.|s) || pi_ref(.|s)),
  exact over the vocabulary.
- `eval/kl_to_ref`: sampled sequence-level KL(pi || pi_ref), the mean of
  log pi(y|x) - log pi_ref(y|x) over y ~ pi, with its standard error. The samples
  stop at `eval.max_new_tokens`, so this is the KL between the two models'
  distributions over responses *truncated* at that many tokens (results.json says
  so in `kl_to_ref_truncated_at`), not over complete responses.
- `eval/implicit_reward_acc`: how often r(x, y) = beta * log pi(y|x)/pi_ref(y|x)
  ranks the chosen response above the rejected one (ties count half; beta > 0
  does not change a ranking, so it is not needed).

All three run in float32 whatever `trainer.precision` says (as `ibridge qlogit`
does): they are differences of log-probs of two close models, and bf16 logits
(resolution 1/16 at 10) would bury those differences in rounding.

Under torchrun each takes ``shard`` (the run's DistInfo; every rank calls): every rank
scores its share of the one-process batches and the sums are gathered, so each rank
returns the value one process computes (up to the order of float64 additions).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from ibridge.chunking import row_chunks
from ibridge.data.collate import pad_sequences
from ibridge.distributed import DistInfo, all_reduce_sum, shard_of
from ibridge.evaluation.stats import mean_and_stderr, preferences_from_scores
from ibridge.refcache import sequence_token_logps, token_budget_batches
from ibridge.runtime import Runtime

# `token_kl`'s default budget of (padded) tokens per forward pass: the two models' float32
# logits of one batch are 2 * TOKEN_BUDGET * V * 4 bytes (4.2 GB at V = 128256).
TOKEN_BUDGET = 4096
# Rows of the (N, V) logits turned into log-probs at once: 2**24 float32 elements (64 MiB) per block.
CHUNK_ELEMENTS = 2**24


def fp32(runtime: Runtime) -> Runtime:
    """`runtime` without autocast: evaluation log-probs are float32 on every device."""
    return dataclasses.replace(runtime, precision="fp32")


def _my_batches(batches: list[list[int]], shard: DistInfo | None) -> list[tuple[list[int], bool]]:
    """``(batch, counted)`` for this rank: its round-robin share of `batches`. Where the
    policy's forward is itself a collective (FSDP, ZeRO-3: `shard.sharded`), every rank must
    run as many forwards as the others, so a rank with one batch fewer runs a stand-in
    (counted=False: its result is dropped)."""
    if shard is None or not shard.enabled:
        return [(batch, True) for batch in batches]
    mine = [(batches[k], True) for k in shard_of(len(batches), shard)]
    if shard.sharded and batches:
        rounds = -(-len(batches) // shard.world_size)  # the most batches any rank has
        mine += [(batches[0], False)] * (rounds - len(mine))
    return mine


@torch.no_grad()
def token_kl(policy, reference, sequences: list[dict], runtime: Runtime, pad_id: int,
             max_tokens: int | None = None, shard: DistInfo | None = None) -> float:
    """Mean exact KL(pi(.|s_t) || pi_ref(.|s_t)) over the scored positions of `sequences`.

    Float32 without autocast, no KV cache. Memory: batches of at most `max_tokens` padded
    tokens (default `TOKEN_BUDGET`; a single longer sequence forms its own batch), so at its
    peak this holds the two models' float32 logits of one batch (2 * max_tokens * V floats)
    plus a few (rows, V) float32 blocks of `CHUNK_ELEMENTS` each, where the log-softmaxes
    and the KL are computed chunk by chunk over the scored positions only (as
    `objectives/logprobs.py` does) — never a full (B, T, V) log-softmax.

    With `shard`, each rank takes its share of the batches (:func:`_my_batches`) and the
    sum and count are all-reduced: every rank returns the mean over all sequences.
    """
    max_tokens = int(max_tokens or TOKEN_BUDGET)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    policy.eval()
    reference.eval()
    for chunk, counted in _my_batches(token_budget_batches([len(seq["input_ids"]) for seq in sequences], max_tokens), shard):
        batch = pad_sequences([sequences[i] for i in chunk], pad_id)
        batch = {key: value.to(runtime.device) for key, value in batch.items()}
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        logits_pi = policy(**kwargs).logits  # (B, T, V)
        logits_ref = reference(**kwargs).logits  # (B, T, V)
        vocab = logits_pi.shape[-1]
        # Position t predicts token t + 1: the rows whose next token is scored, as flat (B*T) indices.
        scored = torch.zeros_like(batch["labels"], dtype=torch.bool)  # (B, T)
        scored[:, :-1] = batch["labels"][:, 1:] != -100
        rows = scored.reshape(-1).nonzero().squeeze(-1)  # (N,)
        flat_pi = logits_pi.reshape(-1, vocab)  # (B*T, V): a view, no copy
        flat_ref = logits_ref.reshape(-1, vocab)
        if not counted:  # a stand-in: its forwards kept the collectives paired; nothing to add
            rows = rows[:0]
        for part in row_chunks(rows.numel(), vocab, CHUNK_ELEMENTS):
            index = rows[part]
            logp = F.log_softmax(flat_pi[index].float(), dim=-1)  # (n, V)
            logq = F.log_softmax(flat_ref[index].float(), dim=-1)  # (n, V)
            # sum_v p_v (log p_v - log q_v), summed over the n rows
            total += F.kl_div(logq, logp, reduction="sum", log_target=True).double().cpu()
            del logp, logq
        count += int(rows.numel())
        del logits_pi, logits_ref, flat_pi, flat_ref
    if shard is not None and shard.enabled:
        summed, count = all_reduce_sum([float(total), float(count)], shard)
        return summed / max(count, 1.0)
    return float(total) / max(count, 1)


def response_sequences(generations: list[dict]) -> list[dict]:
    """Prompt + generated response as scored sequences (loss on the response only)."""
    out = []
    for gen in generations:
        prompt, response = gen["prompt_ids"], gen["response_ids"]
        if not response:
            continue
        out.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return out


def sequence_logps(model, sequences, runtime, pad_id, shard: DistInfo | None = None) -> np.ndarray:
    """log pi(y|x) of each sequence, float32 forward passes (no autocast) whatever `runtime` says;
    with `shard`, each rank its share of the batches, every rank gets all values."""
    values = sequence_token_logps(model, sequences, fp32(runtime), pad_id, shard=shard)
    return np.array([float(v.sum()) for v in values])


def kl_from_logps(policy_logps: np.ndarray, reference_logps: np.ndarray) -> tuple[float, float]:
    """Monte-Carlo KL(pi || pi_ref) and its standard error from log pi(y|x) and log pi_ref(y|x)
    of responses y ~ pi (each model scored on its own, so only one need be in memory)."""
    return mean_and_stderr(np.asarray(policy_logps) - np.asarray(reference_logps))


def implicit_accuracy_from_logps(policy: tuple[np.ndarray, np.ndarray],
                                 reference: tuple[np.ndarray, np.ndarray]) -> float:
    """Share of pairs whose implicit reward log pi/pi_ref ranks chosen above rejected (ties
    half), from each model's ``(log p(chosen), log p(rejected))``."""
    r_chosen = np.asarray(policy[0]) - np.asarray(reference[0])
    r_rejected = np.asarray(policy[1]) - np.asarray(reference[1])
    return float(np.mean(preferences_from_scores(r_chosen, r_rejected)))


def pair_logps(model, pairs: list[dict], runtime: Runtime, pad_id: int,
               shard: DistInfo | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(log p(chosen), log p(rejected))`` of each pair under `model`, float32."""
    chosen = sequence_logps(model, [pair["chosen"] for pair in pairs], runtime, pad_id, shard)
    rejected = sequence_logps(model, [pair["rejected"] for pair in pairs], runtime, pad_id, shard)
    return chosen, rejected


def sampled_kl(policy, reference, samples: list[dict], runtime: Runtime, pad_id: int,
               shard: DistInfo | None = None) -> tuple[float, float]:
    """Monte-Carlo KL(pi || pi_ref) over responses sampled from pi, with its standard error.

    The responses are whatever `samples` holds, so with generation capped at
    `max_new_tokens` this is the KL over responses truncated there.
    """
    sequences = response_sequences(samples)
    return kl_from_logps(sequence_logps(policy, sequences, runtime, pad_id, shard),
                         sequence_logps(reference, sequences, runtime, pad_id, shard))


def implicit_reward_accuracy(policy, reference, pairs: list[dict], runtime: Runtime, pad_id: int,
                             shard: DistInfo | None = None) -> float:
    """Share of pairs whose implicit reward ranks chosen above rejected (ties half)."""
    return implicit_accuracy_from_logps(pair_logps(policy, pairs, runtime, pad_id, shard),
                                        pair_logps(reference, pairs, runtime, pad_id, shard))
