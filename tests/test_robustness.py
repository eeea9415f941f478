"""Numerical faults, secrets, pickle-free loading and determinism (runs that can be trusted)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from ibridge.models import load_model
from ibridge.objectives import OBJECTIVES, available_objectives, build_objective
from ibridge.runtime import resolve_runtime
from ibridge.tracking import read_metrics
from tests.test_cli_smoke import ibridge

DEMONSTRATION = [n for n in available_objectives() if build_objective({"name": n}).data_kind == "demonstrations"]
PREFERENCE = [n for n in available_objectives() if n not in DEMONSTRATION]


@pytest.mark.parametrize("name", DEMONSTRATION)
@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_extreme_log_ratios_stay_finite_through_every_demonstration_objective(name, granularity):
    accepted = OBJECTIVES[name].param_names()
    params = {"name": name, **{k: v for k, v in {"granularity": granularity, "beta": 1.0}.items() if k in accepted}}
    objective = build_objective(params)
    if objective.needs_reference_logits:  # sft_kl, asft: a KL over whole logits
        _extreme_logits_stay_finite(objective)
        return
    policy = torch.tensor([[-1e4, -0.1, -50.0], [-1e-6, -3e3, -2.0]], requires_grad=True)  # (B, T)
    reference = torch.tensor([[-0.1, -1e4, -2.0], [-3e3, -1e-6, -80.0]])
    mask = torch.ones_like(reference, dtype=torch.bool)
    out = objective(policy, reference if objective.needs_reference else None, mask)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(policy.grad).all()


def _extreme_logits_stay_finite(objective) -> None:
    """The anchored objectives on logits of +-1e4 (probabilities that underflow to 0 in float32,
    in the policy and the reference at different tokens), in both KL directions."""
    from ibridge.objectives import token_logps

    for direction in ("policy_ref", "ref_policy"):
        objective.kl_direction = direction
        logits = torch.tensor([[[1e4, -1e4, 0.0, -50.0], [-1e4, 1e4, -3e3, 0.0], [0.0, 0.0, 0.0, 0.0]],
                               [[-1e-6, -3e3, 1e4, 2.0], [5e3, -5e3, 0.0, 1e4], [1.0, -1.0, 0.0, 0.0]]],
                              requires_grad=True)  # (B, T+1, V)
        ref_logits = torch.tensor([[[-1e4, 1e4, 0.0, 80.0], [1e4, -1e4, 3e3, 0.0], [0.0, 0.0, 0.0, 0.0]],
                                   [[3e3, -1e-6, -1e4, 2.0], [-5e3, 5e3, 1e4, 0.0], [1.0, -1.0, 0.0, 0.0]]])
        labels = torch.tensor([[-100, 1, 0], [-100, 0, 2]])  # the policy's least likely tokens are scored
        logps, mask = token_logps(logits, labels)
        ref_logps, _ = token_logps(ref_logits, labels)
        out = objective(logps, ref_logps, mask, logits=logits, ref_logits=ref_logits)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(logits.grad).all(), direction


@pytest.mark.parametrize("name", PREFERENCE)
def test_extreme_margins_stay_finite_through_every_preference_objective(name):
    objective = build_objective({"name": name})
    chosen = torch.tensor([-1e4, -1.0, -5e3], requires_grad=True)
    rejected = torch.tensor([-1.0, -1e4, -5e3], requires_grad=True)
    out = objective(chosen, rejected, torch.tensor([-1.0, -1e4, 0.0]), torch.tensor([-1e4, -1.0, 0.0]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(chosen.grad).all()


def test_nan_loss_stops_the_stage_names_the_step_and_keeps_the_last_good_state(tmp_path, model_cache):
    # A learning rate of 1e30 blows the weights up after the first update.
    proc = ibridge(["train", "debug=smoke", "lr=1e30", "logger=none", "sft.log_every=1", "sft.save_every=1",
                    "sft.max_steps=10", "hydra.run.dir=run"], tmp_path, model_cache, check=False)
    assert proc.returncode != 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed"
    assert "NonFiniteLoss" in results["error"]
    bad_step = int(re.search(r"at step (\d+)", results["error"]).group(1))
    assert bad_step > 1
    # save_every=1: the state kept is the one of the last step that was finite.
    state = json.loads((tmp_path / "run" / "sft" / "state" / "trainer_state.json").read_text())
    assert state["step"] == bad_step - 1
    assert not (tmp_path / "run" / "sft" / "checkpoint").exists()


def test_weights_load_only_from_safetensors(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    config.save_pretrained(tmp_path)
    torch.save(LlamaForCausalLM(config).state_dict(), tmp_path / "pytorch_model.bin")  # pickle only
    assert list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path, resolve_runtime({"device": "cpu", "precision": "fp32"}))


def test_secrets_never_reach_configs_logs_results_or_wandb(tmp_path, model_cache, monkeypatch):
    secret = "sekret-4c1d-should-never-appear"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", secret)
    ibridge(["train", "debug=smoke", "hydra.run.dir=run"], tmp_path, model_cache)
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "expected an offline wandb run"
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_same_config_and_seed_give_identical_metrics(tmp_path, model_cache):
    args = ["debug=smoke", "logger=none", "dpo.max_steps=6"]
    ibridge([*args, "hydra.run.dir=a"], tmp_path, model_cache)
    ibridge([*args, "hydra.run.dir=b"], tmp_path, model_cache)

    def strip(records):
        return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in records]

    first, second = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert first and strip(first) == strip(second)
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert a["eval_by_stage"] == b["eval_by_stage"]
