"""One training stage, wired: data → encoding → cached reference → objective → loop → checkpoint.

`train` runs one stage; `pipeline` runs SFT then DPO through the same function.
The reference pi_ref is the model the stage starts from unless given (docs/design.md
§1: the base model for SFT, the SFT model for DPO).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from ibridge import launch_env
from ibridge.adapters import ADAPTER_DIR, save_adapter
from ibridge.data.collate import collate_demonstrations, collate_pairs
from ibridge.data.formatting import IGNORE_INDEX, encode_split
from ibridge.device_memory import release_memory
from ibridge.distributed import barrier, full_model_state
from ibridge.evaluation.drift import HeldoutKL
from ibridge.io import write_json_atomic
from ibridge.lora import lora_enabled, merged, wrap_with_lora
from ibridge.models import (
    cache_root,
    load_model,
    load_tokenizer,
    reference_pass_dtype,
    save_checkpoint,
    trains_on_bf16_weights,
)
from ibridge.objectives import build_objective
from ibridge.objectives.logprobs import sequence_logps, token_logps
from ibridge.packing import PackedForward, packing_supported, scored_logps
from ibridge.refcache import cached_reference_logps
from ibridge.resource_config import gradient_checkpointing
from ibridge.stage_inputs import DPO_KINDS, SFT_KINDS, StageGuard, check_only_stop
from ibridge.stage_settings import stage_run_config
from ibridge.training import OptimSettings, optimise

log = logging.getLogger(__name__)

STAGE_RECORD = "stage.json"


def demonstration_step(objective, reference=None):
    """compute(model, batch) for objectives on demonstrations (sft, tv, chi2, dft, asft, ...).

    An objective with ``needs_reference_logits`` (sft_kl, asft: a KL over the vocabulary at
    every demonstration prefix) also gets the policy's logits and `reference`'s on the same
    batch: `reference` is the frozen reference model (`logits_reference`), run without
    gradients in the step's autocast. Its (B, T, V) logits live only until the objective
    returns; the KL keeps just their scored rows for the backward pass (objectives/vocab_divergence.py).
    """
    if objective.needs_reference_logits and reference is None:
        raise ValueError(f"objective '{objective.name}' needs a reference model in the training step "
                         "(demonstration_step(objective, reference=...))")

    def compute(model, batch):
        if not objective.needs_reference_logits:
            logps, mask = scored_logps(model, batch)  # (B, T-1): packed, logits at scored tokens only
            return objective(logps, batch.get("ref_logps"), mask)
        # A KL over the vocabulary needs every scored position's whole distribution, both models'.
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        logits = model(**inputs).logits  # (B, T, V); no KV cache: nothing is generated
        logps, mask = token_logps(logits, batch["labels"])  # (B, T-1)
        with torch.no_grad():
            ref_logits = reference(**inputs).logits  # (B, T, V)
        return objective(logps, batch.get("ref_logps"), mask, logits=logits, ref_logits=ref_logits)

    return compute


def logits_reference(objective, reference_path: Path, runtime, pack: bool = True):
    """The frozen reference model a `needs_reference_logits` objective runs in every training
    step, or None for the other objectives (their reference is the cached log-probs).

    Weights in the dtype the policy trains on (`reference_pass_dtype`), so that at step 0 the
    two models' logits agree and the KL anchor starts at zero, as the cached implicit rewards
    do; packed like the policy's forward where the model supports it (ibridge/packing.py).
    A full copy on every process: under FSDP or ZeRO-3 it is not sharded.
    """
    if not objective.needs_reference_logits:
        return None
    model = load_model(reference_path, runtime, for_inference=True, dtype=reference_pass_dtype(runtime))
    return PackedForward(model) if pack and packing_supported(model, runtime) else model


def preference_step(objective):
    """compute(model, batch) for preference objectives: chosen and rejected in one forward."""

    def compute(model, batch):
        logps, mask = scored_logps(model, batch)  # (2B, T-1)
        chosen, rejected = sequence_logps(logps, mask).chunk(2)  # (B,), (B,)
        return objective(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"])

    return compute


def loss_units(objective):
    """count_units(batch) for `optimise`: what the objective's loss is a mean over, counted on
    the CPU batch (scored tokens, sequences or pairs; ibridge/batching.py)."""
    if objective.data_kind == "demonstrations":
        return lambda batch: objective.loss_units(batch["labels"][:, 1:] != IGNORE_INDEX)
    return lambda batch: objective.loss_units(batch["input_ids"].shape[0] // 2)  # chosen rows, then rejected


def attach_reference(encoded: list[dict], kind: str, reference_path: Path, ctx, pad_id: int) -> None:
    """Add cached reference log-probs to each encoded example (in place).

    Every rank calls it: on a cache miss each scores its share of the sequences and all get
    every value (``cached_reference_logps``), so no rank idles in a collective meanwhile."""
    if kind == "demonstrations":
        sequences = encoded
    else:
        sequences = [ex["chosen"] for ex in encoded] + [ex["rejected"] for ex in encoded]
    values = cached_reference_logps(reference_path, sequences, ctx.runtime, pad_id, cache_root(ctx.cfg.model))
    if kind == "demonstrations":
        for example, value in zip(encoded, values, strict=True):
            example["ref_logps"] = value
    else:
        n = len(encoded)
        for i, example in enumerate(encoded):
            example["ref_chosen"] = float(values[i].sum())
            example["ref_rejected"] = float(values[n + i].sum())


def drift_evaluator(ctx, tokenizer, reference_path: Path):
    """`kl/token` on held-out demonstrations (`ibridge.evaluation.drift.HeldoutKL`): exact
    KL(pi || pi_ref) per prefix (docs/design.md §1), both models in the precision of the
    policy's forward; None when the data holds no held-out demonstrations."""
    heldout_examples = ctx.source.examples("heldout_demonstrations")
    if not heldout_examples:
        return None
    heldout, _ = encode_split(tokenizer, heldout_examples, "demonstrations", int(ctx.cfg.model.max_length))
    return HeldoutKL(heldout, reference_path, ctx.runtime, tokenizer.pad_token_id)


def load_trainable(init_path: Path, ctx):
    """The model a stage trains: fp32 weights (the optimiser's master copy; under DeepSpeed the
    engine's dtype, its masters being in its optimiser); with LoRA, the
    frozen base in the run's compute dtype on GPUs (bf16: half the memory, and autocast
    would cast it anyway) under fp32 adapters (peft upcasts them); with
    ``trainer.gradient_checkpointing``, activations recomputed in the backward pass
    (non-reentrant; with LoRA, peft's input-grad hook so that the frozen embeddings'
    output carries gradients into the checkpointed blocks)."""
    cfg, runtime = ctx.cfg, ctx.runtime
    lora = lora_enabled(cfg.model)
    frozen_dtype = torch.bfloat16 if lora and trains_on_bf16_weights(runtime) else None
    if runtime.dist.mode == "deepspeed":  # the engine's weights (ibridge/zero.py): bf16 under bf16, half the memory
        from ibridge.zero import engine_weights_dtype

        frozen_dtype = engine_weights_dtype(runtime.precision)
    model = load_model(init_path, runtime, on_device=not runtime.dist.sharded, dtype=frozen_dtype)
    if gradient_checkpointing(cfg):  # trainer.gradient_checkpointing, or the model config's default
        model.config.use_cache = False
        # transformers >= 5.x names it activation checkpointing; older releases gradient checkpointing.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora:
            model.enable_input_require_grads()
    if lora:
        model = wrap_with_lora(model, cfg.model.lora)
    return model


def optim_settings(cfg, opt_cfg, lr: float) -> OptimSettings:
    """The optimisation settings of one stage: its own ``sft.*``/``dpo.*`` block and learning rate,
    with the run-wide schedule, seed and packing."""
    return OptimSettings(
        lr=float(lr),
        epochs=int(opt_cfg.epochs),
        max_steps=int(opt_cfg.max_steps),
        batch_size=int(opt_cfg.batch_size),
        grad_accum=int(opt_cfg.grad_accum),
        weight_decay=float(opt_cfg.weight_decay),
        max_grad_norm=float(opt_cfg.max_grad_norm),
        log_every=int(opt_cfg.log_every),
        save_every=int(opt_cfg.get("save_every", 0)),
        save_every_min=float(opt_cfg.get("save_every_min", 0)),
        eval_every=int(opt_cfg.eval_every),
        warmup_ratio=float(cfg.schedule.warmup_ratio),
        schedule=str(cfg.schedule.name),
        seed=int(cfg.seed),
        pack_sequences=bool(cfg.trainer.get("pack_sequences", True)),
        optimizer=str(opt_cfg.get("optimizer", "adamw")),
    )


def stage_record(ctx, objective, lr: float, summary, encoded: list, enc_stats, init_path: Path,
                 reference_path: Path, evaluate) -> dict:
    """What results.json and stage.json say of a trained stage (before its checkpoint is saved)."""
    record = {
        "objective": objective.name,
        "lr": float(lr),
        "steps": summary.steps,
        "runtime_s": round(summary.runtime_s, 3),
        "tokens": summary.tokens,
        "examples": len(encoded),
        "truncated": enc_stats.truncated,
        "skipped": enc_stats.skipped,
        "data": getattr(ctx.source, "reports", {}),
        "resumed_from_step": summary.resumed_from,
        "init": str(init_path),
        "lora": lora_enabled(ctx.cfg.model),
        "reference": str(reference_path),
    }
    if "kl/token" in summary.final_metrics:
        record["kl_token"] = summary.final_metrics["kl/token"]
        record["kl_token_precision"] = evaluate.precision  # both models' forward (issue 20, item 11)
    if ctx.runtime.dist.enabled:
        record["world_size"] = ctx.runtime.dist.world_size
        record["distributed"] = ctx.runtime.dist.mode
        record["rank_checksums"] = summary.rank_checksums
    record.update(launch_env.identity(ctx.runtime.dist.world_size))  # world size; Slurm job id, requeues
    return record


def save_adapters(ctx, model, out_dir: Path, record: dict) -> None:
    """LoRA: the adapters alone too, saved before they are merged away."""
    if lora_enabled(ctx.cfg.model):
        record["adapter"] = str(out_dir / ADAPTER_DIR)
        if ctx.runtime.dist.is_main:
            save_adapter(model, out_dir / ADAPTER_DIR)


def save_stage(ctx, model, tokenizer, out_dir: Path, record: dict):
    """Save a trained stage: the checkpoint, then ``stage.json``, which marks the stage finished,
    and only then drop its resumable state. Every rank calls this (FSDP gathers the weights on
    rank 0); returns the gathered weights for the caller to free."""
    record["checkpoint"] = str(out_dir / "checkpoint")
    weights = full_model_state(model, ctx.runtime.dist)  # FSDP: gathered on rank 0 (every rank calls)
    if ctx.runtime.dist.is_main:
        save_checkpoint(model, tokenizer, out_dir / "checkpoint", state_dict=weights)
        write_json_atomic(out_dir / STAGE_RECORD, record)  # the stage counts as finished only from here
        shutil.rmtree(out_dir / "state", ignore_errors=True)
    return weights


def train_stage(ctx, *, stage: str, objective_cfg, lr: float, opt_cfg, init_path: Path, out_dir: Path,
                reference_path: Path | None = None, run_name: str | None = None) -> dict:
    """Train one stage from `init_path`; returns the stage's record for results.json.

    Resumable: a stage whose ``stage.json`` exists finished earlier and is skipped; a
    stage with a saved state under ``<out_dir>/state`` continues from it.
    """
    cfg = ctx.cfg
    out_dir = Path(out_dir)
    done_marker = out_dir / STAGE_RECORD
    reference_path = Path(reference_path or init_path)
    objective = build_objective(objective_cfg)
    kind = objective.data_kind
    inputs = StageGuard(ctx, out_dir, stage, SFT_KINDS if kind == "demonstrations" else DPO_KINDS,
                        {"init": init_path, "reference": reference_path})
    if done_marker.is_file() and (out_dir / "checkpoint").is_dir():
        inputs.refuse_if_changed(finished=True)  # a stale result is never skipped to
        log.info("%s: finished earlier (%s); skipping", stage, done_marker)
        return json.loads(done_marker.read_text())
    check_only_stop(ctx, stage)
    inputs.refuse_if_changed(finished=False)
    tokenizer = load_tokenizer(init_path, ctx.runtime, cfg.model)
    pad = tokenizer.pad_token_id
    encoded, enc_stats = encode_split(tokenizer, ctx.source.examples(kind), kind, int(cfg.model.max_length))
    if objective.needs_reference:
        attach_reference(encoded, kind, reference_path, ctx, pad)

    settings = optim_settings(cfg, opt_cfg, lr)
    run_config = stage_run_config(cfg, stage, objective_cfg, lr, init_path, reference_path)
    ctx.logger.start(stage, run_name or stage, config=run_config,
                     home=out_dir)  # keeps the run id: a resumed stage continues its wandb run
    model = load_trainable(init_path, ctx)
    inputs.record()  # from here a rerun resumes or skips this stage only with the same inputs
    collate = collate_demonstrations if kind == "demonstrations" else collate_pairs
    evaluate = drift_evaluator(ctx, tokenizer, reference_path) if kind == "demonstrations" else None
    reference = logits_reference(objective, reference_path, ctx.runtime, settings.pack_sequences)
    summary = optimise(
        model, encoded, lambda items: collate(items, pad),
        demonstration_step(objective, reference) if kind == "demonstrations" else preference_step(objective),
        settings, ctx.runtime, log=ctx.logger.log, desc=f"{stage} ({objective.name})", evaluate=evaluate,
        state_dir=out_dir / "state", bookmark=ctx.logger.bookmark, rewind=ctx.logger.rewind,
        count_units=loss_units(objective),
    )
    record = stage_record(ctx, objective, lr, summary, encoded, enc_stats, init_path, reference_path, evaluate)
    del reference  # the training step's reference model, if any
    save_adapters(ctx, model, out_dir, record)
    model = merged(model, init_path, ctx.runtime)  # LoRA: the merged fp32 model, the next stage's reference
    weights = save_stage(ctx, model, tokenizer, out_dir, record)
    barrier(ctx.runtime.dist)
    ctx.logger.summary({f"stage/{k}": v for k, v in record.items() if isinstance(v, (int, float))})
    ctx.logger.finish()
    # The evaluation (or the next stage) loads the next model: give this one's memory back first.
    # An FSDP2-sharded model holds reference cycles, which `del` alone never frees.
    del model, weights
    release_memory()
    return record
