"""The whole `ibridge debug=smoke` pipeline through the real CLI, in a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import ibridge  # noqa: F401  (other test modules import it from here)

# `smoke_run`: the session's smoke pipeline (tests/conftest.py).


def test_results_json_contract(smoke_run):
    results = json.loads((smoke_run / "results.json").read_text())
    assert results["status"] == "completed"
    assert set(results["stages"]) == {"sft", "dpo"}
    for stage, record in results["stages"].items():
        for key in ("objective", "lr", "steps", "runtime_s", "checkpoint"):
            assert key in record, (stage, key)
        assert record["steps"] > 0
    assert results["stages"]["sft"]["objective"] == "sft"
    assert results["stages"]["dpo"]["objective"] == "dpo"
    for key in ("gold_reward", "win_rate", "win_rate_ci", "lc_win_rate", "avg_length", "kl_to_ref",
                "implicit_reward_acc"):
        assert key in results["eval"], key
    low, high = results["eval"]["win_rate_ci"]
    assert 0.0 <= low <= results["eval"]["win_rate"] <= high <= 1.0
    assert set(results["eval_by_stage"]) == {"base", "sft", "dpo"}


def test_checkpoints_are_hf_safetensors_and_parameters_changed(smoke_run):
    results = json.loads((smoke_run / "results.json").read_text())
    sft_dir = Path(results["stages"]["sft"]["checkpoint"])
    dpo_dir = Path(results["stages"]["dpo"]["checkpoint"])
    base_dir = Path(results["stages"]["sft"]["init"])
    for folder in (sft_dir, dpo_dir):
        assert (folder / "model.safetensors").is_file()
        assert (folder / "config.json").is_file()
        assert (folder / "tokenizer.json").is_file()
        assert not list(folder.glob("*.bin")), "weights must be safetensors only"
    base, sft, dpo = (load_file(str(d / "model.safetensors")) for d in (base_dir, sft_dir, dpo_dir))
    assert any(not torch.equal(base[k], sft[k]) for k in base), "SFT did not change any parameter"
    assert any(not torch.equal(sft[k], dpo[k]) for k in sft), "DPO did not change any parameter"


def test_generations_metrics_config_and_wandb(smoke_run):
    for stage in ("base", "sft", "dpo"):
        rows = [json.loads(line) for line in (smoke_run / "eval" / stage / "generations.jsonl").open()]
        assert rows and {"prompt", "output", "reference", "reward", "preference"} <= set(rows[0])
        alpaca = json.loads((smoke_run / "eval" / stage / "alpaca_eval.json").read_text())
        assert {"instruction", "output", "generator"} == set(alpaca[0])
    assert (smoke_run / "config.yaml").is_file()
    records = [json.loads(line) for line in (smoke_run / "metrics.jsonl").open()]
    stages = {r["stage"] for r in records}
    assert {"sft", "dpo", "eval"} <= stages
    dpo_keys = set().union(*(r.keys() for r in records if r["stage"] == "dpo"))
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "train/loss"} <= dpo_keys
    offline_runs = list((smoke_run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) >= 5, offline_runs  # eval base, sft, eval sft, dpo, eval dpo


def test_train_one_dpo_stage_from_a_checkpoint(smoke_run, tmp_path, model_cache):
    results = json.loads((smoke_run / "results.json").read_text())
    sft_dir = results["stages"]["sft"]["checkpoint"]
    ibridge(["train", "debug=smoke", "objective=dpo", "dpo.lr=1e-4", f"checkpoint={sft_dir}", "logger=none",
             "hydra.run.dir=train_dpo"], tmp_path, model_cache)
    out = json.loads((tmp_path / "train_dpo" / "results.json").read_text())
    assert out["status"] == "completed" and out["stages"]["dpo"]["reference"] == sft_dir


def test_unknown_job_lists_valid_jobs(tmp_path, model_cache):
    proc = ibridge(["trian"], tmp_path, model_cache, check=False)
    assert proc.returncode == 2
    assert "pipeline" in proc.stderr and "train" in proc.stderr and "eval" in proc.stderr


def test_bad_lr_is_a_one_line_error_before_any_model_loads(tmp_path, model_cache):
    proc = ibridge(["train", "lr=-1", "hydra.run.dir=bad"], tmp_path, model_cache, check=False)
    assert proc.returncode == 2
    assert "lr=-1" in proc.stderr and "config error" in proc.stderr
    assert not (tmp_path / "bad").exists()  # no run folder left behind


def test_unknown_key_and_option_are_one_line_errors(tmp_path, model_cache):
    for override, expected in (("objective.betaa=1", "betaa"), ("objective=jsdd", "jsd, pearson")):
        proc = ibridge([override], tmp_path, model_cache, check=False)
        assert proc.returncode == 2
        assert expected in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


def test_sampled_kl_depends_on_the_seed_not_on_earlier_random_draws(smoke_run, tmp_path, model_cache):
    """Sweep cells share a process: the KL estimate must not depend on what ran before it."""
    from ibridge.data import source_for
    from ibridge.evaluation.evaluate import evaluate_checkpoint
    from ibridge.runtime import resolve_runtime
    from tests.conftest import compose_config

    cfg = compose_config(["debug=smoke", f"model.cache_dir={model_cache}", "eval.num_prompts=16"])
    runtime = resolve_runtime(cfg.trainer)
    results = json.loads((smoke_run / "results.json").read_text())
    policy, reference = Path(results["stages"]["dpo"]["checkpoint"]), Path(results["stages"]["sft"]["checkpoint"])
    estimates = []
    for draws in (0, 1000):
        torch.rand(draws)  # other work in the same process moves the global RNG
        metrics = evaluate_checkpoint(cfg, source_for(cfg.data), policy, reference, runtime, tmp_path / str(draws),
                                      "dpo")
        estimates.append(metrics["kl_to_ref"])
        # the responses are sampled up to eval.max_new_tokens: the KL is over responses cut there
        assert metrics["kl_to_ref_truncated_at"] == cfg.eval.max_new_tokens
    assert estimates[0] == estimates[1]
