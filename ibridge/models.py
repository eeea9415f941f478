"""Loading models and tokenizers; building (once) and caching the toy base model.

Every model, toy or real, loads through `AutoModelForCausalLM` /
`AutoTokenizer` from a folder in Hugging Face format, weights from safetensors
only (never pickle).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ibridge.distributed import DistInfo, barrier
from ibridge.io import publish_dir, staging_dir
from ibridge.runtime import Runtime, seed_everything

log = logging.getLogger(__name__)

# Bump when the base model's recipe changes in code, so cached builds are redone.
TOY_BASE_VERSION = 1
READY_MARKER = "ibridge_base.json"


def cache_root(model_cfg) -> Path:
    return Path(str(model_cfg.get("cache_dir") or "~/.cache/ibridge")).expanduser()


def load_tokenizer(path: str | Path, runtime: Runtime | None = None, model_cfg=None):
    """The tokenizer, with `model.chat_template` applied if it has none (a base model's)."""
    from transformers import AutoTokenizer

    from ibridge.data.formatting import prepare_tokenizer

    trust = bool(runtime and runtime.trust_remote_code)
    return prepare_tokenizer(AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust), model_cfg)


def inference_dtype(runtime: Runtime) -> torch.dtype:
    """The dtype inference models (reference pass, evaluation, judge) load their weights in.

    bf16 under ``precision=bf16``: loading fp32 weights and relying on autocast would keep an
    fp32 master copy nobody updates plus autocast's bf16 copy of every weight. fp32 under
    ``precision=fp32`` (CPUs). Under ``precision=fp16`` the weights stay fp32 and autocast runs
    the matmuls in fp16: fp16's range (max 65504) is too narrow for the residual stream of
    bf16-trained models, which autocast keeps in fp32.
    """
    return torch.bfloat16 if runtime.precision == "bf16" else torch.float32


def trains_on_bf16_weights(runtime: Runtime) -> bool:
    """Whether training's forward runs on bf16 weights rather than autocast over fp32 ones:
    FSDP's bf16 parameter policy, DeepSpeed bf16, and a LoRA stage's frozen base on a GPU
    under ``precision=bf16`` (loaded in bf16, ``ibridge.stages.load_trainable``)."""
    if runtime.precision != "bf16":
        return False
    return runtime.dist.mode in ("fsdp", "deepspeed") or (runtime.lora and runtime.device.type == "cuda")


def reference_pass_dtype(runtime: Runtime) -> torch.dtype:
    """The weights the reference pass runs on: those the policy's training forward runs on,
    so that at step 0 the implicit reward ``beta * (log pi - log pi_ref)`` is zero rather than
    numerical noise (up to 0.025 nats per sequence was measured between the two numerics).

    * bf16 weights where training runs on them (`trains_on_bf16_weights`): a bf16 residual
      stream.
    * Otherwise (one process or DDP under ``precision=bf16``, full fine-tuning) training runs
      autocast over fp32 weights (fp32 residual stream, bf16 matmuls): the reference loads
      fp32 and runs under the same autocast. It costs fp32 weights once, which training holds
      anyway.
    """
    return torch.bfloat16 if trains_on_bf16_weights(runtime) else torch.float32


def load_model(
    path: str | Path,
    runtime: Runtime,
    trust_remote_code: bool | None = None,
    on_device: bool = True,
    for_inference: bool = False,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
):
    """A causal LM from a Hugging Face folder or hub name on `runtime.device` (on the CPU with
    ``on_device=False``: FSDP moves each rank's shard itself).

    Weights are fp32 for training (the optimiser's master copy). With ``for_inference=True``
    they load directly in :func:`inference_dtype` (no fp32 copy is ever materialised), and the
    model comes in eval mode without gradients. `dtype`, when given, overrides both (a LoRA
    stage's frozen base in bf16, a reference pass in the numerics training runs with).
    `attn_implementation`, when given, overrides the run's (an fp32 scoring pass under a
    flash-attention run: `ibridge.scoring.load_scoring_model`).
    """
    from transformers import AutoModelForCausalLM

    if trust_remote_code is None:
        trust_remote_code = runtime.trust_remote_code
    path = str(path)
    local = Path(path).expanduser()
    if local.exists() and not any(local.glob("*.safetensors")):
        raise FileNotFoundError(f"{local}: no model in safetensors format (expected model*.safetensors)")
    model = AutoModelForCausalLM.from_pretrained(
        str(local) if local.exists() else path,
        dtype=dtype or (inference_dtype(runtime) if for_inference else torch.float32),
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation or runtime.attn_implementation,
    )
    if for_inference:
        model.eval().requires_grad_(False)
    return model.to(runtime.device) if on_device else model


def save_checkpoint(model, tokenizer, final_dir: Path, state_dict: dict | None = None) -> Path:
    """Write model (safetensors) and tokenizer; the folder appears only once complete.

    `state_dict`, when given, replaces the module's own weights (FSDP: the gathered
    full weights of a sharded model). The saved generation_config stops at EOS and at
    the chat template's end-of-turn token, so a plain ``generate()`` on the checkpoint
    stops where the trained model ends its turn (`ibridge.data.end_of_turn`)."""
    from ibridge.data.end_of_turn import stop_token_ids
    from ibridge.data.formatting import TemplateError

    if getattr(tokenizer, "chat_template", None) and getattr(model, "generation_config", None) is not None:
        try:
            model.generation_config.eos_token_id = stop_token_ids(tokenizer)
        except TemplateError as err:  # the weights are saved all the same; evaluation will refuse the template
            log.warning("%s: generation_config keeps eos_token_id only: %s", final_dir, err)
    tmp = staging_dir(final_dir)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    publish_dir(tmp, final_dir)
    return Path(final_dir)


# --------------------------------------------------------------------------- toy base


def _pretrain_recipe(model_cfg) -> dict:
    recipe = OmegaConf.to_container(model_cfg.pretrain, resolve=True)
    if recipe.get("seed") is None:  # the world's seed: keys (and caches) from before the option stay valid
        recipe.pop("seed", None)
    return recipe


def pretrain_seed(model_cfg, world_config) -> int:
    seed = model_cfg.pretrain.get("seed")
    return world_config.seed if seed is None else int(seed)


def toy_base_key(model_cfg, world_config) -> str:
    """Cache key: the base model's own recipe (architecture, pretraining) and the world."""
    recipe = {
        "version": TOY_BASE_VERSION,
        "architecture": OmegaConf.to_container(model_cfg.architecture, resolve=True),
        "pretrain": _pretrain_recipe(model_cfg),
        "max_length": int(model_cfg.max_length),
        "world": world_config.fingerprint(),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _file_lock(path: Path):
    """Exclusive lock (filelock: released when its holder dies), so parallel sweep cells and
    ranks build the base model once."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def ensure_toy_base(model_cfg, world_config, runtime: Runtime) -> Path:
    """The toy base model's folder, built and cached on first use (docs/design.md §2)."""
    if model_cfg.get("name_or_path"):
        return Path(str(model_cfg.name_or_path)).expanduser()
    key = toy_base_key(model_cfg, world_config)
    final = cache_root(model_cfg) / "base" / key
    if runtime.dist.enabled and not runtime.dist.is_main:
        # Rank 0 builds it: inside a process group transformers' save_pretrained writes the
        # weights on rank 0 only, so a base built by another rank would have none.
        barrier(runtime.dist)
        if not (final / READY_MARKER).is_file():
            raise FileNotFoundError(f"{final}: rank 0 built no toy base model here")
        return final
    with _file_lock(final.with_suffix(".lock")):  # parallel sweep cells build it once
        if (final / READY_MARKER).is_file():
            log.info("toy base model: reusing %s", final)
        else:
            log.info("toy base model: building %s (once; cached afterwards)", final)
            build_toy_base(model_cfg, world_config, dataclasses.replace(runtime, dist=DistInfo()), final)
    barrier(runtime.dist)  # the other ranks wait for it above
    return final


def build_toy_base(model_cfg, world_config, runtime: Runtime, final: Path) -> None:
    """A small Llama pretrained on the world's noisy corpus, without the chat format."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ibridge.training import OptimSettings, optimise
    from ibridge.world import build_tokenizer, build_world

    seed = pretrain_seed(model_cfg, world_config)
    seed_everything(seed)
    world = build_world(world_config)
    tokenizer = build_tokenizer(world_config)
    arch = OmegaConf.to_container(model_cfg.architecture, resolve=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch["hidden_size"],
        intermediate_size=arch["intermediate_size"],
        num_hidden_layers=arch["num_hidden_layers"],
        num_attention_heads=arch["num_attention_heads"],
        num_key_value_heads=arch.get("num_key_value_heads", arch["num_attention_heads"]),
        max_position_embeddings=arch.get("max_position_embeddings", 64),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        attn_implementation=runtime.attn_implementation,
    )
    model = LlamaForCausalLM(config)
    items = [corpus_item(tokenizer, line, int(model_cfg.max_length)) for line in world.corpus]
    pre = model_cfg.pretrain
    settings = OptimSettings(
        lr=float(pre.lr),
        epochs=int(pre.epochs),
        batch_size=int(pre.batch_size),
        weight_decay=float(pre.weight_decay),
        warmup_ratio=float(pre.warmup_ratio),
        log_every=50,
        seed=seed,
    )
    pad = tokenizer.pad_token_id
    summary = optimise(
        model, items, lambda batch: collate_corpus(batch, pad), causal_lm_loss, settings, runtime, desc="pretrain base"
    )
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tmp = staging_dir(final)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / READY_MARKER).write_text(
        json.dumps(
            {
                "world": world_config.fingerprint(),
                "parameters": sum(p.numel() for p in model.parameters()),
                "pretrain_steps": summary.steps,
                "pretrain_runtime_s": round(summary.runtime_s, 2),
                "final_loss": summary.final_metrics.get("train/loss"),
            },
            indent=2,
        )
    )
    publish_dir(tmp, final)


def corpus_item(tokenizer, line: str, max_length: int) -> dict:
    ids = [tokenizer.bos_token_id] + tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = ids[:max_length]
    return {"input_ids": ids, "labels": list(ids)}


def collate_corpus(items: list[dict], pad_id: int) -> dict:
    from ibridge.data.collate import pad_sequences

    return pad_sequences(items, pad_id)


def causal_lm_loss(model, batch):
    """Next-token cross-entropy over every non-pad token: the `sft` objective on whole lines."""
    from ibridge.objectives import build_objective
    from ibridge.objectives.logprobs import token_logps

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    logps, mask = token_logps(logits, batch["labels"])  # (B, T-1)
    return build_objective({"name": "sft"})(logps, None, mask)
