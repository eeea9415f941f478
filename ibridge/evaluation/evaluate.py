"""Evaluate a checkpoint: generations judged against fixed reference outputs.

Metrics (`eval/…`, docs/design.md §3): `gold_reward`, `win_rate` (ties count half)
with a bootstrap 95% interval `win_rate_ci`, `lc_win_rate`, `avg_length`, and,
when a reference model is given, `kl_to_ref` (+ `kl_to_ref_se`) and
`implicit_reward_acc` on held-out pairs (both float32, docs/design.md §3). `kl_to_ref` is
sampled with generation capped at `eval.max_new_tokens`, so it is the KL between the
two models' distributions over responses truncated there; `kl_to_ref_truncated_at`
records that cap next to it. `judge_truncated` / `judge_truncated_reference` count
the model's and the reference outputs whose prompt the judge had to shorten to fit
its context (see `judges.RewardModelJudge`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ibridge.data.formatting import encode_split
from ibridge.device_memory import release_memory
from ibridge.distributed import DistInfo, merge_shares, shard_of
from ibridge.evaluation import stats
from ibridge.evaluation.drift import (
    implicit_accuracy_from_logps,
    kl_from_logps,
    pair_logps,
    response_sequences,
    sequence_logps,
)
from ibridge.evaluation.generate import generate
from ibridge.evaluation.judges import build_judge
from ibridge.io import write_json_atomic
from ibridge.judging.stage import judge_stage, scoring_judge, uses_alpaca_judge
from ibridge.models import load_model, load_tokenizer
from ibridge.resource_config import DEFAULT_GENERATION_TOKENS
from ibridge.runtime import Runtime
from ibridge.scoring import load_scoring_model, scores_in_fp32


def evaluate_checkpoint(
    cfg, source, policy_path: Path, reference_path: Path | None, runtime: Runtime, out_dir: Path, generator: str,
    model_name: str | None = None,
) -> dict:
    """Generate, judge and compare; writes generations.jsonl and alpaca_eval.json under `out_dir`.

    `generator` labels the progress bar (``base``, ``dpo``); `model_name` (default: `generator`) is
    alpaca_eval.json's ``generator``, the name AlpacaEval's leaderboard shows for the model.

    Under torchrun every rank calls it and returns the same metrics: each rank generates,
    judges and scores its share of the one-process batches (``shard`` below), the results
    are gathered in prompt order, and rank 0 alone writes the files. The sampled responses
    for `kl_to_ref` are drawn batch by batch from RNGs seeded by (`seed`, batch index)
    (``generate.batch_seed``), so they do not depend on how the batches are split.

    One model is in memory at a time: the policy for generation (weights in the run's compute
    dtype: bf16 under ``precision=bf16``, so the KV cache is bf16 and no weight is re-cast at
    each decode step), the policy for scoring (float32 weights, an attention implementation
    that runs in float32: `ibridge.scoring.load_scoring_model`; the same model when generation
    already ran on such weights), the judge, then the reference (float32, the same way).
    Generation batches hold at most ``eval.max_batch_tokens`` tokens of prompt and new tokens
    (`ibridge.evaluation.generate.generation_batches`), which bounds the KV cache.
    """
    info = runtime.dist
    out_dir = Path(out_dir)
    ev = cfg.eval
    main = info.is_main
    tokenizer = load_tokenizer(policy_path, runtime, cfg.model)
    pad = tokenizer.pad_token_id
    examples = source.examples("eval")
    if ev.num_prompts > 0:
        examples = examples[: ev.num_prompts]
    prompts = [example["prompt"] for example in examples]
    budget = int(ev.get("max_batch_tokens", DEFAULT_GENERATION_TOKENS))
    policy = load_model(policy_path, runtime, for_inference=True)  # the compute dtype's weights
    generations = generate(
        policy, tokenizer, prompts, runtime, ev.max_new_tokens, ev.batch_size, ev.do_sample, ev.temperature,
        desc=f"generate ({generator})" if main else None, seed=int(cfg.seed), shard=info, max_batch_tokens=budget,
    )
    drift: dict = {}
    if reference_path is not None:
        # Responses y ~ pi for the sampled KL, and log pi of them and of the held-out pairs.
        samples = generate(policy, tokenizer, prompts, runtime, ev.max_new_tokens, ev.batch_size, True, 1.0,
                           desc="sample for KL" if main else None, seed=int(cfg.seed), shard=info,
                           max_batch_tokens=budget)
        sampled = response_sequences(samples)
        if not scores_in_fp32(policy, runtime):  # bf16 weights, or an fp16/bf16-only attention kernel
            del policy
            release_memory()
            policy = load_scoring_model(policy_path, runtime)
        drift["policy_samples"] = sequence_logps(policy, sampled, runtime, pad, info)
        heldout = source.examples("heldout_pairs") if "heldout_pairs" in source.kinds else []
        if heldout:
            pairs, _ = encode_split(tokenizer, heldout, "preferences", cfg.model.max_length)
            drift["policy_pairs"] = pair_logps(policy, pairs, runtime, pad, info)
    del policy
    release_memory()

    judge = build_judge(scoring_judge(cfg.judge, source), runtime)  # judge=alpaca_eval: gold beside it, or none
    outputs = [gen["text"] for gen in generations]
    references = [example["reference"] for example in examples]
    verdicts = _judged(judge, prompts, outputs, info)
    ref_verdicts = _judged(judge, prompts, references, info)
    lengths = np.array([len(text.split()) for text in outputs])
    ref_lengths = np.array([len(text.split()) for text in references])
    metrics = {"avg_length": float(lengths.mean()), "num_prompts": len(prompts), "judge": judge.name,
               "judge_truncated": sum(bool(v.get("truncated")) for v in verdicts),
               "judge_truncated_reference": sum(bool(v.get("truncated")) for v in ref_verdicts)}
    prefs = [None] * len(prompts)
    if judge.scores:
        rewards = np.array([v["reward"] for v in verdicts])
        ref_rewards = np.array([v["reward"] for v in ref_verdicts])
        prefs = stats.preferences_from_scores(rewards, ref_rewards)
        low, high = stats.bootstrap_ci(prefs, n_resamples=ev.bootstrap_resamples, seed=cfg.seed)
        metrics.update(
            {
                # The gold judge's reward; for a reward-model judge, its mean score.
                "gold_reward" if judge.name == "gold" else "reward": float(rewards.mean()),
                "win_rate": stats.win_rate(prefs),
                "win_rate_ci": [low, high],
                "lc_win_rate": stats.length_controlled_win_rate(prefs, lengths, ref_lengths),
            }
        )
        # Subsets the data names, each scored on its own: the toy world's `retained_skill` (gold
        # reward on tasks only pretraining taught, REPRODUCTION.md) and `taught_skill`.
        for name, mask in getattr(source, "eval_slices", lambda _prompts: {})(prompts).items():
            if any(mask):
                metrics[name] = float(rewards[np.asarray(mask, dtype=bool)].mean())
    del judge
    release_memory()
    if uses_alpaca_judge(cfg):  # pairwise against the reference outputs, through an OpenAI-compatible server
        metrics = judge_stage(cfg, examples, outputs, metrics, out_dir, info, generator)

    if reference_path is not None:
        reference = load_scoring_model(reference_path, runtime)
        metrics["kl_to_ref"], metrics["kl_to_ref_se"] = kl_from_logps(
            drift["policy_samples"], sequence_logps(reference, sampled, runtime, pad, info))
        # A KL over responses cut at this many tokens, not over complete responses.
        metrics["kl_to_ref_truncated_at"] = int(ev.max_new_tokens)
        if "policy_pairs" in drift:
            metrics["implicit_reward_acc"] = implicit_accuracy_from_logps(
                drift["policy_pairs"], pair_logps(reference, pairs, runtime, pad, info))
        del reference
        release_memory()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_generations(out_dir, examples, outputs, verdicts, ref_verdicts, prefs, model_name or generator)
    return metrics


def _judged(judge, prompts: list, responses: list[str], info: DistInfo) -> list[dict]:
    """``judge.score`` of every response; with several ranks each scores its share of the
    judge's batches (``judge.batch_size`` responses in order, as one process would batch
    them: the same padding, so the same rewards), gathered in prompt order on every rank."""
    if not info.enabled:
        return judge.score(prompts, responses)
    size = max(1, int(getattr(judge, "batch_size", 1) or 1))
    blocks = list(range(0, len(prompts), size))
    mine = [i for k in shard_of(len(blocks), info) for i in range(blocks[k], min(blocks[k] + size, len(prompts)))]
    partial: list[dict | None] = [None] * len(prompts)
    for index, verdict in zip(mine, judge.score([prompts[i] for i in mine], [responses[i] for i in mine]),
                              strict=True):
        partial[index] = verdict
    return merge_shares(partial, info)


def _write_generations(out_dir, examples, outputs, verdicts, ref_verdicts, prefs, generator) -> None:
    rows = []
    for example, output, verdict, ref_verdict, pref in zip(
        examples, outputs, verdicts, ref_verdicts, prefs, strict=True
    ):
        rows.append(
            {
                "prompt": example["prompt"],
                "output": output,
                "reference": example["reference"],
                "reward": verdict["reward"],
                "first_error": verdict["first_error"],
                "reference_reward": ref_verdict["reward"],
                "preference": None if pref is None else float(pref),
            }
        )
    tmp = out_dir / ".generations.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out_dir / "generations.jsonl")
    # AlpacaEval's model_outputs format: a JSON list of {instruction, output, generator}.
    alpaca = [
        {"instruction": example["prompt"] if isinstance(example["prompt"], str) else json.dumps(example["prompt"]),
         "output": output, "generator": generator}
        for example, output in zip(examples, outputs, strict=True)
    ]
    write_json_atomic(out_dir / "alpaca_eval.json", alpaca)
