"""LoRA merge precision (issue 20, item 9): on a GPU the frozen base is bf16, and an adapter
update smaller than half a bf16 ulp of its weight rounds away if added to it there. The merged
checkpoint must be the init checkpoint's weights plus ``scaling * B @ A``, in fp32.

The CUDA path is driven on the CPU: the base is loaded in bf16 as `load_trainable` does on a
GPU under ``precision=bf16``, and the independent computation is float64 from the files.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from ibridge.distributed import DistInfo
from ibridge.lora import merged, wrap_with_lora
from ibridge.models import load_model
from ibridge.runtime import Runtime

CPU = Runtime(device=torch.device("cpu"), precision="fp32")
LORA = OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]})
RELATIVE_UPDATE = 1e-3  # |scaling * B @ A| ~ 0.1% of the mean |W|: the case


@pytest.fixture()
def init_folder(tmp_path):
    """A stage's init checkpoint in fp32 whose weights are not bf16 numbers (an SFT checkpoint)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, attn_implementation="eager")
    folder = tmp_path / "init"
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def lora_on_bf16_base(folder):
    """The model a LoRA stage trains on a GPU under bf16: the frozen base loaded in bf16, fp32
    adapters, then a small trained-looking update (B is zero at initialisation)."""
    model = wrap_with_lora(load_model(folder, CPU, on_device=False, dtype=torch.bfloat16), LORA)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
        for _, layer in lora_layers(model):
            weight = layer.base_layer.weight
            delta = layer.get_delta_weight("default")
            layer.lora_B["default"].weight.mul_(RELATIVE_UPDATE * weight.float().abs().mean() / delta.abs().mean())
    return model


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)]


def expected_weights(folder, model) -> dict[str, torch.Tensor]:
    """Float64, from the files and the adapters: W_init + scaling * B @ A for the adapted layers,
    W_init elsewhere."""
    weights = {name: value.double() for name, value in load_file(str(folder / "model.safetensors")).items()}
    for name, layer in lora_layers(model):
        a = layer.lora_A["default"].weight.detach().double()
        b = layer.lora_B["default"].weight.detach().double()
        weights[f"{name}.weight"] += layer.scaling["default"] * (b @ a)
    return weights


def test_the_merge_is_the_init_checkpoint_plus_the_update_in_fp32(init_folder):
    torch.set_num_threads(1)
    model = lora_on_bf16_base(init_folder)
    expected = expected_weights(init_folder, model)
    init = load_file(str(init_folder / "model.safetensors"))
    adapted = {f"{name}.weight" for name, _ in lora_layers(model)}
    assert len(adapted) == 2 * 3
    state = merged(model, init_folder, CPU).state_dict()
    assert not any("lora" in name for name in state)
    for name, want in expected.items():
        got = state[name]
        assert got.dtype == torch.float32, name
        # fp32 rounding of W + update only (2**-24 relative), not bf16's 2**-9.
        assert float((got.double() - want).abs().max()) <= 2e-7 * float(want.abs().max()), name
        if name not in adapted:
            assert torch.equal(got, init[name]), f"{name}: the frozen weights must be the init checkpoint's"
    # The update reached every element: none rounded back to the init weight.
    kept = [float((state[n] != init[n]).float().mean()) for n in adapted]
    assert min(kept) > 0.99, kept


def test_only_the_writing_rank_merges_and_other_parameters_are_refused(init_folder):
    model = lora_on_bf16_base(init_folder)
    other_rank = dataclasses.replace(CPU, dist=DistInfo(rank=1, world_size=2, mode="ddp"))
    assert merged(model, init_folder, other_rank) is model  # it writes no checkpoint: no fp32 copy
    model.get_base_model().model.norm.weight.requires_grad_(True)  # e.g. peft's modules_to_save
    with pytest.raises(ValueError, match="model.norm.weight"):
        merged(model, init_folder, CPU)


def test_without_lora_the_model_is_returned_as_it_is(init_folder):
    model = load_model(init_folder, CPU)
    assert merged(model, init_folder, CPU) is model
