"""The correctness check of the TRL benchmarks: ibridge's tokenised sequences, DPO loss and metrics,
and SFT loss against TRL's on identical batches (a subprocess worker, as the timed ones in
workers.py; bench_trl.py and bench_scale.py register it as "check")."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .workers import attach_cold_reference, encode, runtime_for, trl_args, trl_datasets, trl_model


def _perturbed_policy(spec, dpo_enc: list, dpo, runtime, pad: int, tokenizer) -> Path:
    """A policy that differs from the reference (a few DPO steps), so rewards are not all zero."""
    from ibridge.data.collate import collate_pairs
    from ibridge.models import load_model
    from ibridge.stages import preference_step
    from ibridge.training import OptimSettings, optimise

    policy_dir = Path(tempfile.mkdtemp(prefix="bench-policy-"))
    policy = load_model(spec.base, runtime)
    optimise(policy, dpo_enc, lambda items: collate_pairs(items, pad), preference_step(dpo),
             OptimSettings(lr=spec.dpo["lr"], max_steps=spec.check["perturb_steps"], batch_size=spec.check["batch_size"],
                           log_every=10**9), runtime, desc="check: perturb policy")
    policy.save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    return policy_dir


def _sequence_mismatches(trl_dpo, dpo_enc: list, trl_sft, sft_enc: list) -> dict:
    """How many of TRL's tokenised sequences (ids and labels) differ from ibridge's, and the token counts."""
    mismatched = trl_tokens = ours_tokens = 0
    for row, ours in zip(trl_dpo.train_dataset, dpo_enc, strict=True):
        for side in ("chosen", "rejected"):
            ids = row["prompt_ids"] + row[f"{side}_ids"]
            labels = [-100] * len(row["prompt_ids"]) + row[f"{side}_ids"]
            trl_tokens += len(ids)
            ours_tokens += len(ours[side]["input_ids"])
            mismatched += ids != ours[side]["input_ids"] or labels != ours[side]["labels"]
    sft_mismatched = sft_trl_tokens = sft_ours_tokens = 0
    for row, ours in zip(trl_sft.train_dataset, sft_enc, strict=True):
        sft_trl_tokens += len(row["input_ids"])
        sft_ours_tokens += len(ours["input_ids"])
        sft_mismatched += row["input_ids"] != ours["input_ids"] or row["labels"] != ours["labels"]
    return {"dpo_sequences_mismatched": int(mismatched), "dpo_tokens": [ours_tokens, trl_tokens],
            "sft_sequences_mismatched": int(sft_mismatched), "sft_tokens": [sft_ours_tokens, sft_trl_tokens]}


def _compare_losses(spec, forwards: dict, trl_dpo, dpo_enc: list, trl_sft, sft_enc: list, dpo, pad: int) -> dict:
    """ibridge's DPO loss and metrics, and its SFT loss, against TRL's on identical batches, for each of
    ibridge's forwards: the largest absolute differences."""
    import torch

    import ibridge.packing
    from ibridge.data.collate import collate_demonstrations, collate_pairs
    from ibridge.objectives import build_objective
    from ibridge.stages import demonstration_step, preference_step

    n = spec.check["batch_size"]
    sft_step = demonstration_step(build_objective({"name": "sft"}))
    dpo_step = preference_step(dpo)
    keys = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]
    worst = {key: 0.0 for key in ["loss", *keys, "sft_loss"]}
    batches = 0
    values: dict = {}
    by_forward: dict = {}
    budget = ibridge.packing.FUSED_HEAD_BYTES
    for start in range(0, min(len(dpo_enc), spec.check["batches"] * n), n):
        idx = list(range(start, min(start + n, len(dpo_enc))))
        with torch.no_grad():
            trl_dpo._metrics["train"].clear()
            trl_batch = trl_dpo.data_collator([trl_dpo.train_dataset[i] for i in idx])
            trl_loss = trl_dpo.compute_loss(trl_dpo.model, trl_batch)
            theirs = {key: trl_dpo._metrics["train"][key][-1] for key in keys}
            sft_idx = [i for i in idx if i < len(sft_enc)] or [0]  # the splits' sizes differ
            sft_batch = trl_sft.data_collator([trl_sft.train_dataset[i] for i in sft_idx])
            sft_theirs = trl_sft.compute_loss(trl_sft.model, sft_batch)
            for name, (forward, fused_bytes) in forwards.items():
                ibridge.packing.FUSED_HEAD_BYTES = budget if fused_bytes is None else fused_bytes
                ours = dpo_step(forward, collate_pairs([dpo_enc[i] for i in idx], pad))
                worst["loss"] = max(worst["loss"], abs(float(ours.loss) - float(trl_loss)))
                by_forward[name] = max(by_forward.get(name, 0.0), abs(float(ours.loss) - float(trl_loss)),
                                       *(abs(float(ours.metrics[key]) - theirs[key]) for key in keys))
                for key in keys:
                    worst[key] = max(worst[key], abs(float(ours.metrics[key]) - theirs[key]))
                values = {"loss": (float(ours.loss), float(trl_loss)),
                          **{key: (float(ours.metrics[key]), theirs[key]) for key in keys}}
                sft_ours = sft_step(forward, collate_demonstrations([sft_enc[i] for i in sft_idx], pad))
                worst["sft_loss"] = max(worst["sft_loss"], abs(float(sft_ours.loss) - float(sft_theirs)))
            ibridge.packing.FUSED_HEAD_BYTES = budget
        batches += 1
    return {"batches": batches, "forwards": list(forwards), "max_abs_diff": worst, "last_batch": values,
            "dpo_max_abs_diff_by_forward": by_forward}


def worker_check(spec) -> dict:
    """Identical sequences, and ibridge's DPO (and SFT) loss and metrics against TRL's on identical batches.

    ibridge runs each batch through the plain padded forward, the loop's packed forward with
    the model's head at scored tokens, and the packed forward with the chunked head
    (ibridge/lmhead.py), so every path the loop can take is checked against TRL.
    """
    cfg, runtime = runtime_for(spec)
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from ibridge.models import load_model, load_tokenizer
    from ibridge.objectives import build_objective
    from ibridge.packing import PackedForward

    tokenizer = load_tokenizer(spec.base)
    pad = tokenizer.pad_token_id
    sft_enc, dpo_enc = encode(spec, "sft", tokenizer), encode(spec, "dpo", tokenizer)
    attach_cold_reference(spec, dpo_enc, "dpo", cfg, runtime, pad)
    beta = spec.dpo["beta"]
    dpo = build_objective({"name": "dpo", "beta": beta})
    policy_dir = _perturbed_policy(spec, dpo_enc, dpo, runtime, pad, tokenizer)

    out = tempfile.mkdtemp(prefix="bench-trl-")
    sft_data, dpo_data = trl_datasets(spec)
    trl_dpo = DPOTrainer(model=trl_model(spec, policy_dir), ref_model=trl_model(spec, spec.base),
                         args=trl_args(DPOConfig, spec, "dpo", out, beta=beta), train_dataset=dpo_data,
                         processing_class=tokenizer)
    trl_sft = SFTTrainer(model=trl_model(spec, policy_dir), args=trl_args(SFTConfig, spec, "sft", out),
                         train_dataset=sft_data, processing_class=tokenizer)
    # 1. The tokenised sequences are identical.
    result = _sequence_mismatches(trl_dpo, dpo_enc, trl_sft, sft_enc)
    # 2. Loss and metrics on identical batches (policy in train mode; no dropout in these models).
    ours_policy = load_model(policy_dir, runtime)
    ours_policy.train()
    forwards = {"padded": (ours_policy, None),
                "packed, model's head": (PackedForward(ours_policy, fused_head=True), float("inf")),
                "packed, chunked head": (PackedForward(ours_policy, fused_head=True), 0)}
    trl_dpo.model.train()
    trl_sft.model.train()
    return {**result, **_compare_losses(spec, forwards, trl_dpo, dpo_enc, trl_sft, sft_enc, dpo, pad)}
