"""Drift from the reference and implicit-reward accuracy (DESIGN.md §1, §3).

- `kl/token`: mean over demonstration prefixes s of KL(pi(.|s) || pi_ref(.|s)),
  exact over the vocabulary.
- `eval/kl_to_ref`: sampled sequence-level KL(pi || pi_ref), the mean of
  log pi(y|x) - log pi_ref(y|x) over y ~ pi, with its standard error.
- `eval/implicit_reward_acc`: how often r(x, y) = beta * log pi(y|x)/pi_ref(y|x)
  ranks the chosen response above the rejected one (ties count half; beta > 0
  does not change a ranking, so it is not needed).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ibridge.data.collate import pad_sequences
from ibridge.evaluation.stats import mean_and_stderr, preferences_from_scores
from ibridge.refcache import sequence_token_logps
from ibridge.runtime import Runtime


@torch.no_grad()
def token_kl(policy, reference, sequences: list[dict], runtime: Runtime, pad_id: int, batch_size: int = 64) -> float:
    """Mean exact KL(pi(.|s_t) || pi_ref(.|s_t)) over the scored positions of `sequences`."""
    total, count = 0.0, 0
    policy.eval()
    reference.eval()
    for start in range(0, len(sequences), batch_size):
        batch = pad_sequences(sequences[start : start + batch_size], pad_id)
        batch = {key: value.to(runtime.device) for key, value in batch.items()}
        with runtime.autocast():
            logits_pi = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits_ref = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = batch["labels"][:, 1:] != -100  # (B, T-1): positions that predict a response token
        logp = F.log_softmax(logits_pi[:, :-1].float(), dim=-1)[mask]  # (N, V)
        logq = F.log_softmax(logits_ref[:, :-1].float(), dim=-1)[mask]  # (N, V)
        total += float((logp.exp() * (logp - logq)).sum())
        count += int(mask.sum())
    return total / max(count, 1)


def response_sequences(generations: list[dict]) -> list[dict]:
    """Prompt + generated response as scored sequences (loss on the response only)."""
    out = []
    for gen in generations:
        prompt, response = gen["prompt_ids"], gen["response_ids"]
        if not response:
            continue
        out.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return out


def sequence_logps(model, sequences, runtime, pad_id) -> np.ndarray:
    return np.array([float(v.sum()) for v in sequence_token_logps(model, sequences, runtime, pad_id)])


def sampled_kl(policy, reference, samples: list[dict], runtime: Runtime, pad_id: int) -> tuple[float, float]:
    """Monte-Carlo KL(pi || pi_ref) over responses sampled from pi, with its standard error."""
    sequences = response_sequences(samples)
    ratio = sequence_logps(policy, sequences, runtime, pad_id) - sequence_logps(reference, sequences, runtime, pad_id)
    return mean_and_stderr(ratio)


def implicit_reward_accuracy(policy, reference, pairs: list[dict], runtime: Runtime, pad_id: int) -> float:
    """Share of pairs whose implicit reward ranks chosen above rejected (ties half)."""
    chosen = [pair["chosen"] for pair in pairs]
    rejected = [pair["rejected"] for pair in pairs]
    r_chosen = sequence_logps(policy, chosen, runtime, pad_id) - sequence_logps(reference, chosen, runtime, pad_id)
    r_rejected = sequence_logps(policy, rejected, runtime, pad_id) - sequence_logps(
        reference, rejected, runtime, pad_id
    )
    return float(np.mean(preferences_from_scores(r_chosen, r_rejected)))
