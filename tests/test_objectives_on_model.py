"""The objectives on the real toy model: gradients, logged metrics, the reference cache."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from ibridge.data import source_for
from ibridge.data.collate import collate_demonstrations
from ibridge.data.formatting import encode_split
from ibridge.models import ensure_toy_base, load_model, load_tokenizer
from ibridge.objectives import build_objective
from ibridge.refcache import cached_reference_logps
from ibridge.runtime import resolve_runtime
from ibridge.stages import attach_reference, demonstration_step
from tests.conftest import compose_config
from tests.test_cli_smoke import ibridge


@pytest.fixture(scope="module")
def toy(model_cache, tmp_path_factory):
    cfg = compose_config(["debug=smoke", f"model.cache_dir={model_cache}"])
    runtime = resolve_runtime(cfg.trainer)
    source = source_for(cfg.data)
    base = ensure_toy_base(cfg.model, source.world_config, runtime)
    tokenizer = load_tokenizer(base)
    encoded, _ = encode_split(tokenizer, source.examples("demonstrations")[:16], "demonstrations", 48)
    ctx = SimpleNamespace(cfg=cfg, runtime=runtime)
    attach_reference(encoded, "demonstrations", base, ctx, tokenizer.pad_token_id)
    batch = collate_demonstrations(encoded, tokenizer.pad_token_id)
    return SimpleNamespace(cfg=cfg, runtime=runtime, base=base, tokenizer=tokenizer, batch=batch,
                           encoded=encoded)


def gradients(toy, objective_cfg) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = load_model(toy.base, toy.runtime)
    # Move the policy away from the reference so that pi != pi_ref.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.train()
    out = demonstration_step(build_objective(objective_cfg))(model, toy.batch)
    out.loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_tv_token_beta1_has_the_sft_gradient_on_the_toy_model(toy):
    sft = gradients(toy, {"name": "sft"})
    tv = gradients(toy, {"name": "tv", "beta": 1.0, "granularity": "token"})
    for g_sft, g_tv in zip(sft, tv, strict=True):
        torch.testing.assert_close(g_tv, g_sft, rtol=1e-5, atol=1e-7)


def test_jsd_gradient_differs_from_sft_once_the_policy_moves(toy):
    sft = gradients(toy, {"name": "tv", "beta": 1.0, "granularity": "token"})
    jsd = gradients(toy, {"name": "jsd", "beta": 1.0, "granularity": "token"})
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(sft, jsd, strict=True))


def test_reference_cache_hit_skips_the_reference_model(toy):
    sequences = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in toy.encoded]

    def must_not_load():
        raise AssertionError("the reference model was loaded despite a warm cache")

    cached = cached_reference_logps(toy.base, sequences, toy.runtime, toy.tokenizer.pad_token_id,
                                    toy.cfg.model.cache_dir, load_reference=must_not_load)
    for value, example in zip(cached, toy.encoded, strict=True):
        torch.testing.assert_close(value, example["ref_logps"])


def test_train_jsd_stage_logs_the_theory(tmp_path, model_cache):
    ibridge(["train", "debug=smoke", "objective=jsd", "lr=1e-3", "sft.eval_every=2", "logger=none",
             "hydra.run.dir=jsd"], tmp_path, model_cache)
    records = [json.loads(line) for line in (tmp_path / "jsd" / "metrics.jsonl").open()]
    keys = set().union(*records)
    assert {"implicit/reward", "implicit/token_reward", "implicit/weight", "logps/policy", "logps/ref",
            "kl/token"} <= keys
    kl_steps = [r["step"] for r in records if "kl/token" in r]
    assert kl_steps[0] == 2 and len(kl_steps) >= 2
    results = json.loads((tmp_path / "jsd" / "results.json").read_text())
    assert results["stages"]["sft"]["objective"] == "jsd"
    assert results["stages"]["sft"]["kl_token"] > 0
