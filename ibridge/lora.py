"""Optional LoRA (peft) for any stage, merged at the end of the stage.

Merging is what keeps the reference right (docs/design.md §1: pi_ref is the model a
stage starts from): a LoRA SFT stage saves the *merged* SFT model as its
checkpoint, so the DPO stage that starts from it uses the SFT model — not the
base — as its reference, with no adapter bookkeeping.
"""

from __future__ import annotations

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


def merged(model):
    """The plain model with adapters folded into its weights (a no-op without LoRA)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
