"""Evaluate a checkpoint: generations judged against fixed reference outputs.

Metrics (`eval/…`, DESIGN.md §3): `gold_reward`, `win_rate` (ties count half)
with a bootstrap 95% interval `win_rate_ci`, `lc_win_rate`, `avg_length`, and,
when a reference model is given, `kl_to_ref` (+ `kl_to_ref_se`) and
`implicit_reward_acc` on held-out pairs (both float32, DESIGN.md §3). `kl_to_ref` is
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
import torch

from ibridge.data.formatting import encode_split
from ibridge.evaluation import stats
from ibridge.evaluation.drift import implicit_reward_accuracy, sampled_kl
from ibridge.evaluation.generate import generate
from ibridge.evaluation.judges import build_judge
from ibridge.io import write_json_atomic
from ibridge.models import load_model, load_tokenizer
from ibridge.runtime import Runtime


def evaluate_checkpoint(
    cfg, source, policy_path: Path, reference_path: Path | None, runtime: Runtime, out_dir: Path, generator: str
) -> dict:
    """Generate, judge and compare; writes generations.jsonl and alpaca_eval.json under `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ev = cfg.eval
    tokenizer = load_tokenizer(policy_path, runtime, cfg.model)
    policy = load_model(policy_path, runtime)
    examples = source.examples("eval")
    if ev.num_prompts > 0:
        examples = examples[: ev.num_prompts]
    prompts = [example["prompt"] for example in examples]
    generations = generate(
        policy, tokenizer, prompts, runtime, ev.max_new_tokens, ev.batch_size, ev.do_sample, ev.temperature,
        desc=f"generate ({generator})",
    )
    judge = build_judge(cfg.judge, runtime)
    outputs = [gen["text"] for gen in generations]
    references = [example["reference"] for example in examples]
    verdicts = judge.score(prompts, outputs)
    ref_verdicts = judge.score(prompts, references)
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
    if reference_path is not None:
        pad = tokenizer.pad_token_id
        reference = load_model(reference_path, runtime)
        # Sampled from an RNG seeded here, so the estimate depends on `seed` alone, not on
        # what ran earlier in the process (a sweep's cells share one process).
        devices = [runtime.device.index or 0] if runtime.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(cfg.seed))
            samples = generate(
                policy, tokenizer, prompts, runtime, ev.max_new_tokens, ev.batch_size, True, 1.0,
                desc="sample for KL",
            )
        metrics["kl_to_ref"], metrics["kl_to_ref_se"] = sampled_kl(policy, reference, samples, runtime, pad)
        # A KL over responses cut at this many tokens, not over complete responses.
        metrics["kl_to_ref_truncated_at"] = int(ev.max_new_tokens)
        heldout = source.examples("heldout_pairs") if "heldout_pairs" in source.kinds else []
        if heldout:
            pairs, _ = encode_split(tokenizer, heldout, "preferences", cfg.model.max_length)
            metrics["implicit_reward_acc"] = implicit_reward_accuracy(policy, reference, pairs, runtime, pad)
    _write_generations(out_dir, examples, outputs, verdicts, ref_verdicts, prefs, generator)
    return metrics


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
