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

`kl_to_ref` and `implicit_reward_acc` run in float32 whatever `trainer.precision` says
(as `ibridge qlogit` does): they are differences of log-probs of two close models, and
bf16 logits (resolution 1/16 at 10) would bury those differences in rounding. On GPUs
their matmuls run in TF32 unless ``trainer.tf32=false`` (ibridge/scoring.py).
`kl/token` runs both models in the precision of the policy's own forward (`HeldoutKL`):
float32 where training is autocast over fp32 weights (one GPU, DDP), bf16 where the
trained weights are bf16 (FSDP's and DeepSpeed's bf16, LoRA's bf16 base), with float32
log-softmaxes; results.json names it (``kl_token_precision``).

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
from ibridge.device_memory import release_memory
from ibridge.distributed import DistInfo, all_reduce_sum, shard_of
from ibridge.evaluation.stats import mean_and_stderr, preferences_from_scores
from ibridge.lmhead import plain_head
from ibridge.packing import final_hidden_states, takes_logits_mask
from ibridge.refcache import sequence_token_logps, token_budget_batches
from ibridge.runtime import Runtime
from ibridge.scoring import (
    attention_implementation,
    fp32_matmuls,
    load_scoring_model,
    policy_forward_dtype,
    scoring_attention,
)

# `token_kl`'s default budget of (padded) tokens per forward pass. Its memory is the two models'
# last hidden states at the scored positions (2 * S * H) and row chunks of logits, not logits of
# the batch (which were 2 * TOKEN_BUDGET * V * 4 bytes, 4.2 GB at V = 128256, before issue 20).
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


class _ScoredRows:
    """One model's outputs at the scored positions of a padded batch, in row-major order of the
    batch, produced a chunk of rows at a time: `n` rows of `vocab` logits.

    Scored the way the training loop scores (ibridge/packing.py): where the head may run outside
    the model's forward (`whole`: the model is not sharded; a plain ``nn.Linear`` head), the
    decoder's last hidden states at the scored positions (S, H) and the head applied a chunk of
    rows at a time; else the model's logits at the scored positions only (``logits_to_keep`` as
    a mask, (S, V)); else, for model code without it, the full (B, T, V) logits, read at the
    scored rows chunk by chunk.
    """

    def __init__(self, model, inputs: dict, scored: torch.Tensor, whole: bool):
        self.hidden = self.logits = self.rows = None
        self.head = plain_head(model) if whole else None
        if self.head is not None:
            rest = {key: value for key, value in inputs.items() if key != "input_ids"}
            self.hidden = final_hidden_states(model, inputs["input_ids"], rest)[scored]  # (S, H)
            self.vocab = self.head.weight.shape[0]
        elif takes_logits_mask(model):
            self.logits = model(**inputs, logits_to_keep=scored).logits  # (S, V)
            self.vocab = self.logits.shape[-1]
        else:
            full = model(**inputs).logits  # (B, T, V)
            self.vocab = full.shape[-1]
            self.logits = full.reshape(-1, self.vocab)  # (B*T, V): a view, no copy
            self.rows = scored.reshape(-1).nonzero().squeeze(-1)  # (S,) flat indices of the scored rows
        self.n = int(scored.sum())

    def chunk(self, part: slice) -> torch.Tensor:
        """float32 logits of rows `part` (n, V)."""
        if self.head is not None:
            return F.linear(self.hidden[part], self.head.weight, self.head.bias).float()
        rows = part if self.rows is None else self.rows[part]
        return self.logits[rows].float()


@torch.no_grad()
def token_kl(policy, reference, sequences: list[dict], runtime: Runtime, pad_id: int,
             max_tokens: int | None = None, shard: DistInfo | None = None) -> float:
    """Mean exact KL(pi(.|s_t) || pi_ref(.|s_t)) over the scored positions of `sequences`.

    No autocast, no KV cache: each model runs in its weights' dtype (the caller loads the
    reference in the dtype the policy's forward runs in: `ibridge.scoring.policy_forward_dtype`)
    and the log-softmaxes and the KL are float32 (TF32 matmuls on GPUs with ``trainer.tf32``:
    `ibridge.scoring.fp32_matmuls`). Memory: batches of at most `max_tokens` padded tokens
    (default `TOKEN_BUDGET`; a longer sequence forms its own batch), each model's outputs at
    the scored positions only (`_ScoredRows`: the last hidden states, S x H, where the head can
    be applied outside the model; the S x V logits of a sharded policy), and the logits,
    log-softmaxes and KL of `CHUNK_ELEMENTS`-sized row chunks: never a (B, T, V) tensor for a
    model with a plain head.

    With `shard`, each rank takes its share of the batches (:func:`_my_batches`) and the
    sum and count are all-reduced: every rank returns the mean over all sequences.
    """
    max_tokens = int(max_tokens or TOKEN_BUDGET)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    policy.eval()
    reference.eval()
    sharded = shard is not None and shard.sharded  # the policy's head is sharded or engine-managed
    batches = token_budget_batches([len(seq["input_ids"]) for seq in sequences], max_tokens)
    with fp32_matmuls(runtime):
        for chunk, counted in _my_batches(batches, shard):
            batch = pad_sequences([sequences[i] for i in chunk], pad_id)
            batch = {key: value.to(runtime.device) for key, value in batch.items()}
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
            # Position t predicts token t + 1: the rows whose next token is scored.
            scored = torch.zeros_like(batch["labels"], dtype=torch.bool)  # (B, T)
            if counted:  # a stand-in only keeps the sharded policy's collectives paired
                scored[:, :-1] = batch["labels"][:, 1:] != -100
            pi = _ScoredRows(policy, inputs, scored, whole=not sharded)
            if not counted:
                continue
            ref = _ScoredRows(reference, inputs, scored, whole=True)
            for part in row_chunks(pi.n, pi.vocab, CHUNK_ELEMENTS):
                logp = F.log_softmax(pi.chunk(part), dim=-1)  # (n, V)
                logq = F.log_softmax(ref.chunk(part), dim=-1)  # (n, V)
                # sum_v p_v (log p_v - log q_v), summed over the n rows
                total += F.kl_div(logq, logp, reduction="sum", log_target=True).double().cpu()
                del logp, logq
            count += pi.n
            del pi, ref
    if shard is not None and shard.enabled:
        summed, count = all_reduce_sum([float(total), float(count)], shard)
        return summed / max(count, 1.0)
    return float(total) / max(count, 1)


class HeldoutKL:
    """`kl/token` in a demonstration stage: the policy against the stage's reference on held-out
    demonstrations (docs/design.md §1), every rank its share (`token_kl` with ``shard``).

    Both sides run in one precision, the one the policy's forward runs in outside autocast
    (`ibridge.scoring.policy_forward_dtype`: bf16 under FSDP's and DeepSpeed's bf16 and for a
    LoRA stage's bf16 base on a GPU, float32 for autocast over fp32 weights); `precision` names
    it for results.json. The reference loads in that dtype on first use, stays for the stage's
    later evaluations, and goes at `close` (after the last one). A float32 pass under a
    flash-attention run uses sdpa: the reference loads with it, and the policy is switched to
    it for the pass and back (ibridge/scoring.py).
    """

    def __init__(self, heldout: list[dict], reference_path, runtime: Runtime, pad_id: int):
        self.heldout, self.reference_path, self.runtime, self.pad_id = heldout, reference_path, runtime, pad_id
        self.dtype = policy_forward_dtype(runtime)
        self.attention = scoring_attention(runtime, self.dtype)
        self.precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        self.reference = None

    def __call__(self, model) -> dict:
        if self.reference is None:
            self.reference = load_scoring_model(self.reference_path, self.runtime, self.dtype)
        with attention_implementation(model, self.attention):
            value = token_kl(model, self.reference, self.heldout, self.runtime, self.pad_id, shard=self.runtime.dist)
        return {"kl/token": value}

    def close(self) -> None:
        """Drop the reference (the loop calls it after the stage's last evaluation)."""
        self.reference = None
        release_memory()


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
    """log pi(y|x) of each sequence, float32 forward passes (no autocast) whatever `runtime` says
    (`model` has float32 weights: `ibridge.scoring.load_scoring_model`; TF32 matmuls on GPUs with
    ``trainer.tf32``); with `shard`, each rank its share of the batches, every rank gets all values."""
    with fp32_matmuls(runtime):
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
