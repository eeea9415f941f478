"""LoRA stages: adapters merged into the checkpoint, and the DPO reference is the SFT model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ibridge.tracking import read_metrics
from tests.test_cli_smoke import ibridge


def test_lora_pipeline_merges_and_uses_the_sft_model_as_dpo_reference(tmp_path, model_cache):
    ibridge(["debug=smoke", "logger=none", "model.lora.enabled=true", "lr=1e-2", "dpo.log_every=1",
             "dpo.max_steps=3", "hydra.run.dir=run"], tmp_path, model_cache)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    sft, dpo = results["stages"]["sft"], results["stages"]["dpo"]
    assert sft["lora"] and dpo["lora"]
    merged_sft = load_file(str(Path(sft["checkpoint"]) / "model.safetensors"))
    base = load_file(str(Path(sft["init"]) / "model.safetensors"))
    assert not any("lora" in key for key in merged_sft), "adapters must be merged into the checkpoint"
    assert merged_sft.keys() == base.keys()
    assert any(not torch.equal(merged_sft[k], base[k]) for k in base), "LoRA SFT changed nothing"
    # Only the adapted projections move; embeddings and norms stay frozen.
    adapted = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # conf/model/toy.yaml
    frozen = [key for key in base if not any(name in key for name in adapted)]
    assert "model.embed_tokens.weight" in frozen and "model.norm.weight" in frozen
    assert sum("layernorm" in key for key in frozen) >= 2  # each layer's input and post-attention norms
    moved = [key for key in frozen if not torch.equal(merged_sft[key], base[key])]
    assert not moved, f"frozen weights changed: {moved}"
    assert dpo["reference"] == sft["checkpoint"]
    # Before its first update the DPO policy *is* the merged SFT model, so implicit rewards are
    # exactly zero if (and only if) the reference is that model too, not the base.
    first = next(r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["stage"] == "dpo")
    assert first["step"] == 1
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5
    # The adapters alone are saved too (peft's format), and applied to the base they give the
    # merged checkpoint: the same weights, up to float rounding of the merge.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = Path(sft["adapter"])
    assert adapter == tmp_path / "run" / "sft" / "adapter" and (adapter / "adapter_model.safetensors").is_file()
    assert not list(adapter.glob("*.bin")), "adapters must be safetensors only"
    rebuilt = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft["init"]), str(adapter))
    rebuilt = rebuilt.merge_and_unload().state_dict()
    for key, value in merged_sft.items():
        torch.testing.assert_close(rebuilt[key], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(rebuilt[k], base[k]) for k in base)
