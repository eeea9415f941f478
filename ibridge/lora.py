"""Optional LoRA (peft) for any stage, merged in fp32 at the end of the stage.

Merging is what keeps the reference right (docs/design.md §1: pi_ref is the model a
stage starts from): a LoRA SFT stage saves the *merged* SFT model as its
checkpoint, so the DPO stage that starts from it uses the SFT model — not the
base — as its reference, with no adapter bookkeeping.

The merge is in fp32 (`merged`): on a GPU the frozen base is bf16, and an update smaller
than half a bf16 ulp of its weight would round away if added to it there (at an update of
0.1% of |W|, most elements: docs/real_setting.md, "LoRA").
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf


def lora_enabled(model_cfg) -> bool:
    lora = model_cfg.get("lora") if model_cfg is not None else None
    return bool(lora and lora.get("enabled", False))


def wrap_with_lora(model, lora_cfg):
    """Freeze the model and add LoRA adapters to `lora_cfg.target_modules`."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=int(lora_cfg.r),
        lora_alpha=int(lora_cfg.alpha),
        lora_dropout=float(lora_cfg.dropout),
        target_modules=list(OmegaConf.to_container(lora_cfg.target_modules, resolve=True))
        if OmegaConf.is_config(lora_cfg.target_modules)
        else list(lora_cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def merged(model, init_path: str | Path, runtime):
    """The plain model with the adapters folded into fp32 weights (`model` itself without LoRA).

    The frozen base is never trained, so the merged model is the stage's init checkpoint
    (`init_path`), read again in fp32 on the CPU, plus each adapter's update
    ``scaling * B @ A`` computed in fp32 (peft's `get_delta_weight`): not peft's
    `merge_and_unload`, which adds the update to the base in memory, in bf16 on a GPU, and
    not the in-memory base, which is the init's bf16 rounding there. Its checkpoint is fp32.

    Only the rank that writes the checkpoint merges (it costs an fp32 copy of the model in
    CPU memory); the other ranks get `model` back unchanged.
    """
    if not hasattr(model, "get_base_model"):
        return model
    if not runtime.dist.is_main:
        return model
    from peft.tuners.lora import LoraLayer

    from ibridge.models import load_model

    trained = [name for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name]
    if trained:  # e.g. peft's modules_to_save: trained weights the init checkpoint does not hold
        raise ValueError(f"LoRA merge: parameters other than the adapters were trained ({', '.join(trained[:3])}); "
                         "only model.lora.target_modules adapters are supported")
    full = load_model(init_path, runtime, on_device=False, dtype=torch.float32)
    full.eval().requires_grad_(False)
    with torch.no_grad():
        for name, layer in model.get_base_model().named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            weight = full.get_submodule(name).weight  # (out, in), fp32, CPU
            for adapter in layer.active_adapters:
                delta = layer.get_delta_weight(adapter).to(device="cpu", dtype=torch.float32)
                if delta.shape != weight.shape:
                    raise RuntimeError(f"LoRA merge: {name}: update {tuple(delta.shape)} does not match the weight "
                                       f"{tuple(weight.shape)}")
                weight.add_(delta)
    return full
