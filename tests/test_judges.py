"""Judges end to end: a tiny reward model saved by the test, and export-only eval."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from ibridge.evaluation.judges import build_judge
from ibridge.runtime import resolve_runtime
from ibridge.world import WorldConfig, build_tokenizer
from tests.test_cli_smoke import ibridge


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm")
    tokenizer = build_tokenizer(WorldConfig())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def test_reward_model_judge_scores_deterministically(reward_model_dir):
    runtime = resolve_runtime({"device": "cpu", "precision": "fp32"})
    judge = build_judge({"name": "reward_model", "path": str(reward_model_dir), "batch_size": 2}, runtime)
    prompts = ["sort 3 1 2", "max 4 9", "reverse 1 2 3"]
    responses = ["1 2 3", "9", "3 2 1"]
    first = [v["reward"] for v in judge.score(prompts, responses)]
    # Batching (with padding) must not change a score.
    single = [judge.score([p], [r])[0]["reward"] for p, r in zip(prompts, responses, strict=True)]
    assert first == pytest.approx(single, abs=1e-5)
    assert len(set(round(x, 6) for x in first)) > 1  # a random model still tells inputs apart


def test_eval_job_with_reward_model_judge(tmp_path, model_cache, reward_model_dir):
    ibridge(["eval", "debug=smoke", "judge=reward_model", f"judge.path={reward_model_dir}", "logger=none",
             "hydra.run.dir=ev"], tmp_path, model_cache)
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    metrics = results["eval"]
    assert metrics["judge"] == "reward_model"
    assert 0.0 <= metrics["win_rate"] <= 1.0 and "reward" in metrics and "gold_reward" not in metrics
    rows = [json.loads(line) for line in (tmp_path / "ev" / "eval" / "checkpoint" / "generations.jsonl").open()]
    assert all(isinstance(row["reward"], float) for row in rows)


def test_eval_job_with_no_judge_exports_only(tmp_path, model_cache):
    ibridge(["eval", "debug=smoke", "judge=none", "logger=none", "hydra.run.dir=ev"], tmp_path, model_cache)
    metrics = json.loads((tmp_path / "ev" / "results.json").read_text())["eval"]
    assert "win_rate" not in metrics and metrics["avg_length"] >= 0
    alpaca = json.loads((tmp_path / "ev" / "eval" / "checkpoint" / "alpaca_eval.json").read_text())
    assert len(alpaca) == metrics["num_prompts"]
