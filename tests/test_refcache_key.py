"""What else must miss the reference-log-prob cache (issue 22): the prompt/response split, the
model's config.json, a LoRA adapter's own config and the base it names, and trust_remote_code.

Each case serves a stale value on a cache that ignores it, so each compares the values too:
a miss is only right if the fresh pass gives other numbers (or, for trust_remote_code, other
code may run).
"""

from __future__ import annotations

import json
import shutil

import torch

from ibridge.runtime import Runtime
from tests.test_refcache import CPU_FP32, Lookup, make_sequences, save_tiny_llama


def _differ(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return any(x.shape != y.shape or not torch.allclose(x, y) for x, y in zip(a, b, strict=True))


def test_the_same_tokens_split_elsewhere_into_prompt_and_response_are_a_miss(tmp_path):
    folder = save_tiny_llama(tmp_path / "model", seed=0)
    lookup, sequences = Lookup(tmp_path / "cache"), make_sequences()
    first = lookup(folder, sequences, CPU_FP32)
    moved = [dict(seq) for seq in sequences]
    labels = list(moved[2]["labels"])
    start = next(i for i, label in enumerate(labels) if label != -100)
    labels[start] = -100  # the first response token now belongs to the prompt: same input_ids
    moved[2] = {"input_ids": moved[2]["input_ids"], "labels": labels}
    second = lookup(folder, moved, CPU_FP32)
    assert lookup.loads == 2, "another prompt/response split was served the old split's log-probs"
    assert second[2][start - 1] == 0.0 and first[2][start - 1] != 0.0  # that position is no longer scored


def test_an_edited_config_json_is_a_miss(tmp_path):
    folder = save_tiny_llama(tmp_path / "model", seed=0)
    lookup, sequences = Lookup(tmp_path / "cache"), make_sequences()
    first = lookup(folder, sequences, CPU_FP32)
    config = json.loads((folder / "config.json").read_text())
    config["rope_theta"] = 100.0  # same weights, other positions: other log-probs
    config.pop("rope_parameters", None)  # newer transformers keep rope_theta here too
    (folder / "config.json").write_text(json.dumps(config))
    second = lookup(folder, sequences, CPU_FP32)
    assert lookup.loads == 2 and _differ(first, second)


def _adapter(tmp_path, base):
    """A LoRA adapter folder on `base` with non-zero B, so it changes the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    folder = tmp_path / "adapter"
    peft_model.save_pretrained(folder, safe_serialization=True)
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(base)
    return folder


def test_a_lora_adapters_alpha_is_part_of_the_key(tmp_path):
    base = save_tiny_llama(tmp_path / "base", seed=0)
    adapter = _adapter(tmp_path, base)
    lookup, sequences = Lookup(tmp_path / "cache"), make_sequences()
    first = lookup(adapter, sequences, CPU_FP32)
    lookup(adapter, sequences, CPU_FP32)
    assert lookup.loads == 1, "the same adapter on the same base must hit"
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["lora_alpha"] = 16  # twice the adapter's scale
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    second = lookup(adapter, sequences, CPU_FP32)
    assert lookup.loads == 2, "an edited lora_alpha was served the old adapter's log-probs"
    assert _differ(first, second)


def test_the_base_a_lora_adapter_names_is_part_of_the_key(tmp_path):
    base = save_tiny_llama(tmp_path / "base", seed=0)
    adapter = _adapter(tmp_path, base)
    lookup, sequences = Lookup(tmp_path / "cache"), make_sequences()
    first = lookup(adapter, sequences, CPU_FP32)
    other = save_tiny_llama(tmp_path / "other", seed=1)
    shutil.copyfile(other / "model.safetensors", base / "model.safetensors")  # the base replaced in place
    second = lookup(adapter, sequences, CPU_FP32)
    assert lookup.loads == 2, "a replaced base was served the old base's log-probs"
    assert _differ(first, second)


def test_trust_remote_code_is_part_of_the_key(tmp_path):
    folder = save_tiny_llama(tmp_path / "model", seed=0)
    lookup, sequences = Lookup(tmp_path / "cache"), make_sequences()
    lookup(folder, sequences, CPU_FP32)
    lookup(folder, sequences, Runtime(device=torch.device("cpu"), precision="fp32", trust_remote_code=True))
    assert lookup.loads == 2, "a pass that may run the folder's own code was served transformers' values"
