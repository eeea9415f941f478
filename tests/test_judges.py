"""Judges end to end: a tiny reward model saved by the test, and export-only eval."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

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


def _conversation_ids(tokenizer, prompt, response) -> list[int]:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]


def _reward_of(judge, ids: list[int]) -> float:
    with torch.no_grad():
        return judge.model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def test_reward_model_judge_cuts_the_prompt_from_the_left_and_keeps_the_response(reward_model_dir):
    """A conversation longer than judge.max_length keeps its whole response (what is scored) and
    the end of its prompt: with the toy template (no BOS) that is exactly its last max_length tokens."""
    runtime = resolve_runtime({"device": "cpu", "precision": "fp32"})
    max_length = 12
    judge = build_judge({"name": "reward_model", "path": str(reward_model_dir), "max_length": max_length}, runtime)
    prompts = ["sort 9 8 7 6 5 4 3 2 1 0 9 8 7", "max 4 9"]
    responses = ["0 1 2 3", "9"]
    full = [_conversation_ids(judge.tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    assert len(full[0]) > max_length >= len(full[1])  # the first must be cut, the second not
    verdicts = judge.score(prompts, responses)
    assert [v["truncated"] for v in verdicts] == [True, False]
    expected = _reward_of(judge, full[0][-max_length:])
    assert verdicts[0]["reward"] == pytest.approx(expected, abs=1e-5)
    # ... and not what cutting on the right (the response) gives
    assert abs(verdicts[0]["reward"] - _reward_of(judge, full[0][:max_length])) > 1e-4
    assert verdicts[1]["reward"] == pytest.approx(_reward_of(judge, full[1]), abs=1e-5)


def test_reward_model_judge_cuts_a_response_longer_than_its_context_on_the_right(reward_model_dir):
    runtime = resolve_runtime({"device": "cpu", "precision": "fp32"})
    judge = build_judge({"name": "reward_model", "path": str(reward_model_dir), "max_length": 6}, runtime)
    prompt, response = "reverse 1 2 3 4 5 6 7 8", "8 7 6 5 4 3 2 1"
    head = judge.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    n_head = len(judge.tokenizer(head, add_special_tokens=False)["input_ids"])
    full = _conversation_ids(judge.tokenizer, prompt, response)
    (verdict,) = judge.score([prompt], [response])
    assert verdict["truncated"]
    assert verdict["reward"] == pytest.approx(_reward_of(judge, full[n_head : n_head + 6]), abs=1e-5)


def test_eval_job_with_reward_model_judge(tmp_path, model_cache, reward_model_dir):
    max_length = 14
    ibridge(["eval", "debug=smoke", "judge=reward_model", f"judge.path={reward_model_dir}", "logger=none",
             f"judge.max_length={max_length}", "hydra.run.dir=ev"], tmp_path, model_cache)
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    metrics = results["eval"]
    assert metrics["judge"] == "reward_model"
    assert 0.0 <= metrics["win_rate"] <= 1.0 and "reward" in metrics and "gold_reward" not in metrics
    rows = [json.loads(line) for line in (tmp_path / "ev" / "eval" / "checkpoint" / "generations.jsonl").open()]
    assert all(isinstance(row["reward"], float) for row in rows)
    # The truncation counts are those of the conversations longer than judge.max_length.
    tokenizer = AutoTokenizer.from_pretrained(str(reward_model_dir))
    too_long = {key: sum(len(_conversation_ids(tokenizer, row["prompt"], row[key])) > max_length for row in rows)
                for key in ("output", "reference")}
    assert metrics["judge_truncated"] == too_long["output"]
    assert metrics["judge_truncated_reference"] == too_long["reference"] > 0


def test_eval_job_with_no_judge_exports_only(tmp_path, model_cache):
    ibridge(["eval", "debug=smoke", "judge=none", "logger=none", "hydra.run.dir=ev"], tmp_path, model_cache)
    metrics = json.loads((tmp_path / "ev" / "results.json").read_text())["eval"]
    assert "win_rate" not in metrics and metrics["avg_length"] >= 0
    alpaca = json.loads((tmp_path / "ev" / "eval" / "checkpoint" / "alpaca_eval.json").read_text())
    assert len(alpaca) == metrics["num_prompts"]
