"""The GPU check's sections on what a stage does besides its steps (benchmarks/gpu_check.py):
`kl/token`, the evaluation's float32 scoring, LoRA's fp32 merge over a bf16 base, gradient
checkpointing. Each returns ``(ok, detail, figures)`` or raises `Skipped`, and each calls the
project's own functions, with an independent computation beside them where there is one."""

from __future__ import annotations

import math
import time
from dataclasses import replace

from benchlib.gpu_model import ModelCase, max_gap, peak_mb, reset_peak, train
from benchlib.gpu_report import Skipped, deterministic

HELDOUT = {"cuda": 16, "cpu": 8}  # held-out demonstrations for kl/token (the float64 check is slow on a CPU)


def perturbed(model, seed: int = 0, scale: float = 0.05):
    """`model` with its matrices scaled by (1 + scale * noise): a reference that differs."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                noise = torch.randn(param.shape, generator=generator).to(param.device, param.dtype)
                param.mul_(1 + scale * noise)
    return model


def exact_token_kl(policy, reference, sequences: list, device) -> float:
    """The independent computation: one unpadded sequence at a time, float64 log-softmax of
    the whole logits, KL(pi || pi_ref) at every scored position."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq["input_ids"]], device=device)
            logp = F.log_softmax(policy(input_ids=ids).logits[0, :-1].double(), dim=-1)
            logq = F.log_softmax(reference(input_ids=ids).logits[0, :-1].double(), dim=-1)
            scored = torch.tensor(seq["labels"][1:], device=device) != -100
            total += float((logp.exp() * (logp - logq)).sum(-1)[scored].sum())
            count += int(scored.sum())
    return total / max(count, 1)


def token_kl_check(case: ModelCase):
    """`ibridge.evaluation.drift.token_kl` as the SFT stage's `kl/token` calls it (policy and
    reference loaded by `load_model` with the run's attention), against `exact_token_kl` on
    eager-attention copies of the same weights."""
    from ibridge.evaluation.drift import token_kl
    from ibridge.models import load_model

    runtime = case.runtime
    heldout = case.encoded("demonstrations")[:HELDOUT.get(runtime.device.type, 8)]
    policy = load_model(case.base, runtime)
    reference = perturbed(load_model(case.base, runtime))
    reset_peak(runtime.device)
    start = time.perf_counter()
    value = token_kl(policy, reference, heldout, runtime, case.tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    peak = peak_mb(runtime.device)
    del policy, reference
    eager = replace(runtime, attn_implementation="eager")
    expected = exact_token_kl(load_model(case.base, eager), perturbed(load_model(case.base, eager)), heldout,
                              runtime.device)
    # token_kl's log-softmax is float32: over a 151,936-token vocabulary its rounding moves a KL of
    # 9e-5 nats/token by 2e-7 (2e-3 relative; the same logits in float64 agree to 1e-16), hence
    # the absolute term.
    ok = math.isfinite(value) and expected > 0 and abs(value - expected) <= 1e-3 * expected + 1e-6
    return (ok, f"kl/token {value:.6g} vs {expected:.6g} (float64, eager, unpadded; limit 1e-3 rel + 1e-6) on "
            f"{len(heldout)} sequences, "
            f"attention {runtime.attn_implementation}, {seconds:.2f} s, peak {peak:.0f} MiB",
            {"kl": value, "expected": expected, "peak_mb": peak})


def evaluate_check(case: ModelCase):
    """`ibridge.evaluation.evaluate.evaluate_checkpoint` with the model as its own reference:
    generation, the gold judge, and the float32 scoring (`kl_to_ref`, `implicit_reward_acc`)
    with the run's attention (flash-attn where installed). The same weights score the same, so
    `kl_to_ref` is 0 and every held-out pair ties (`implicit_reward_acc` 0.5)."""
    from ibridge.data import source_for
    from ibridge.evaluation.evaluate import evaluate_checkpoint

    cfg = case.built()[3]
    if cfg is None:
        raise Skipped("needs a world with a gold judge (the toy base)")
    with deterministic():
        metrics = evaluate_checkpoint(cfg, source_for(cfg.data), case.base, case.base, case.runtime,
                                      case.work / f"eval-{case.name}", generator="gpu-check")
    kl, accuracy = metrics.get("kl_to_ref", math.nan), metrics.get("implicit_reward_acc", math.nan)
    ok = abs(kl) <= 1e-6 and abs(accuracy - 0.5) <= 1e-9 and math.isfinite(metrics.get("win_rate", math.nan))
    return (ok, f"{metrics['num_prompts']} prompts, win rate {metrics.get('win_rate', math.nan):.3f}, kl_to_ref {kl:.2e} "
            f"(expected 0), implicit_reward_acc {accuracy:.3f} (expected 0.5), attention "
            f"{case.runtime.attn_implementation}", {"metrics": metrics})


def lora_check(case: ModelCase):
    """A LoRA stage as on a GPU (frozen base in bf16 under bf16), a few steps, then
    `ibridge.lora.merged`: fp32 weights equal to the base's file plus ``scaling * B @ A``
    (float64), and how many adapted elements a merge into the bf16 base would have kept."""
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    from ibridge.lora import merged

    run = train(case, case.runtime, "sft", lr=1e-3, lora=True, keep_model=True)
    model = run.pop("model")
    base_dtype = next(p for n, p in model.named_parameters() if "lora_" not in n).dtype
    files = sorted(case.base.glob("*.safetensors"))
    expected = {k: v.double() for f in files for k, v in load_file(str(f)).items()}
    deltas = {}
    for name, layer in model.get_base_model().named_modules():
        if isinstance(layer, LoraLayer):
            a, b = layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()
            deltas[f"{name}.weight"] = (layer.scaling["default"] * (b @ a)).cpu()
    for name, delta in deltas.items():
        expected[name] = expected[name] + delta
    state = merged(model, case.base, replace(case.runtime, lora=True)).state_dict()
    dtypes = sorted({str(v.dtype) for v in state.values()})
    error = max(float((state[k].double() - v).abs().max() / v.abs().max().clamp(min=1e-30)) for k, v in expected.items()
                if k in state)
    # A merge into the bf16 base rounds W_bf16 + delta back to bf16: the share of elements it leaves unchanged.
    kept_by_bf16 = [float((((expected[k] - d).bfloat16().double() + d).bfloat16() != (expected[k] - d).bfloat16())
                          .double().mean()) for k, d in deltas.items()]
    ok = dtypes == ["torch.float32"] and error <= 1e-6 and len(deltas) > 0
    return (ok, f"base {str(base_dtype).replace('torch.', '')}, {len(deltas)} adapted matrices; merged {dtypes}, max "
            f"relative error vs float64 {error:.1e}; a bf16 merge would have kept the update in "
            f"{100 * sum(kept_by_bf16) / len(kept_by_bf16):.1f}% of the elements",
            {"error": error, "bf16_merge_kept": sum(kept_by_bf16) / len(kept_by_bf16)})


def checkpointing_check(case: ModelCase):
    """`trainer.gradient_checkpointing` (through `load_trainable`) trains to the same weights as
    without it, under deterministic algorithms; its peak memory beside the plain run's."""
    with deterministic():
        plain = train(case, case.runtime, "sft", lr=1e-3)
        recomputed = train(case, case.runtime, "sft", lr=1e-3, checkpointing=True)
    gap, scale = max_gap(plain["weights"], recomputed["weights"])
    ok = gap <= 1e-5 * scale and all(math.isfinite(x) for x in plain["losses"] + recomputed["losses"])
    return (ok, f"max |W_ckpt - W| {gap:.1e} (limit {1e-5 * scale:.1e}); peak {recomputed['peak_mb']:.0f} MiB vs "
            f"{plain['peak_mb']:.0f} MiB without, {recomputed['tok_s']:.0f} vs {plain['tok_s']:.0f} tok/s",
            {"gap": gap, "peak_mb": recomputed["peak_mb"], "peak_mb_plain": plain["peak_mb"]})
