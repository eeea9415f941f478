"""The GPU check's sections on one model (benchmarks/gpu_check.py). Each returns
``(ok, detail, figures)`` or raises `Skipped`; each calls the project's own code paths.

Tolerances: bf16 against fp32 losses, first step ``<= 0.02 |fp32| + 0.01`` and the mean over
the steps within 5% (bf16 keeps 8 bits of mantissa: 0.4% per rounding; the log-softmax and the
losses are float32 in both). The resume checks run under deterministic algorithms and must be
bit for bit.
"""

from __future__ import annotations

import math
import time

from benchlib.gpu_model import OBJECTIVES, ModelCase, max_gap, train
from benchlib.gpu_report import Skipped, deterministic

FIRST_STEP_TOL = (0.02, 0.01)  # |bf16 - fp32| <= rel * |fp32| + abs, first step
MEAN_LOSS_TOL = 0.05  # relative, mean over the steps


def kind_of(objective: str) -> str:
    return "preferences" if objective == "dpo" else "demonstrations"


def reference_cache(case: ModelCase):
    """A cold reference pass (timed), then a hit returning the same values."""
    import torch

    from ibridge.refcache import cached_reference_logps

    sequences = case.encoded("demonstrations")
    cache = case.work / f"cache-{case.name}-timing"
    start = time.perf_counter()
    cold = cached_reference_logps(case.base, sequences, case.runtime, case.tokenizer.pad_token_id, cache)
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    warm = cached_reference_logps(case.base, sequences, case.runtime, case.tokenizer.pad_token_id, cache)
    warm_s = time.perf_counter() - start
    same = all(torch.equal(a, b) for a, b in zip(cold, warm, strict=True))
    tokens = sum(len(s["input_ids"]) for s in sequences)
    return (same and warm_s < cold_s, f"cold pass {cold_s:.2f} s ({tokens} tokens), hit {warm_s:.2f} s, same values: "
            f"{same}", {"cold_s": cold_s, "warm_s": warm_s})


def steps(case: ModelCase, objective: str, runs: dict):
    """A few optimiser steps in the run's precision: finite losses, tokens/s, peak memory."""
    run = train(case, case.runtime, objective)
    runs[objective] = run
    finite = all(math.isfinite(x) for x in run["losses"])
    return (finite and len(run["losses"]) == case.steps,
            f"{case.steps} steps, {run['tok_s']:.0f} tok/s, peak {run['peak_mb']:.0f} MiB, losses "
            + " ".join(f"{x:.4f}" for x in run["losses"]),
            {"tok_s": run["tok_s"], "peak_mb": run["peak_mb"], "losses": run["losses"]})


def loss_parity(case: ModelCase, objective: str, runs: dict, fp32_runtime):
    """The same steps in fp32 (GPU only): the first step and the mean loss agree within tolerance."""
    if fp32_runtime is None:
        raise Skipped("the run is fp32 already")
    run = runs.get(objective) or train(case, case.runtime, objective)
    ref = train(case, fp32_runtime, objective)
    first, first32 = run["losses"][0], ref["losses"][0]
    mean, mean32 = sum(run["losses"]) / len(run["losses"]), sum(ref["losses"]) / len(ref["losses"])
    ok = abs(first - first32) <= FIRST_STEP_TOL[0] * abs(first32) + FIRST_STEP_TOL[1] and \
        abs(mean - mean32) <= MEAN_LOSS_TOL * abs(mean32)
    return (ok, f"first step {first:.4f} vs {first32:.4f}, mean {mean:.4f} vs {mean32:.4f} (fp32 {ref['tok_s']:.0f} "
            f"tok/s, peak {ref['peak_mb']:.0f} MiB)", {"fp32_losses": ref["losses"]})


def resume_gap(case: ModelCase, runtime, label: str) -> tuple[bool, float, dict]:
    """An uninterrupted sft stage, then the same stage stopped by SIGTERM after step 2 and run
    again (it resumes from its state), under deterministic algorithms: (stopped, max weight
    gap, the uninterrupted run with its model)."""
    from ibridge.training import StopRequested

    state = case.work / f"state-{case.name}{label}"
    with deterministic():
        whole = train(case, runtime, "sft", keep_model=True)
        stopped = False
        try:
            train(case, runtime, "sft", state_dir=state, stop_after=2)
        except StopRequested:
            stopped = True
        resumed = train(case, runtime, "sft", state_dir=state)
    gap, _ = max_gap(whole["weights"], resumed["weights"])
    return stopped, gap, whole


def resume(case: ModelCase):
    """SIGTERM after step 2, the same call again, against an uninterrupted stage: bit for bit."""
    stopped, gap, _ = resume_gap(case, case.runtime, "")
    return (stopped and gap == 0.0, f"SIGTERM at step 2, stopped and saved: {stopped}; max |W_resumed - "
            f"W_uninterrupted| {gap:.1e} (deterministic algorithms; expected 0)", {"gap": gap})


def generation(case: ModelCase):
    """`ibridge.evaluation.generate` on a few prompts, as the eval job calls it."""
    from ibridge.evaluation.generate import generate
    from ibridge.models import load_model

    model = load_model(case.base, case.runtime, for_inference=True)
    prompts = [d["prompt"] for d in case.built()[1]["demonstrations"][:8]]
    start = time.perf_counter()
    rows = generate(model, case.tokenizer, prompts, case.runtime, max_new_tokens=32, batch_size=8)
    seconds = time.perf_counter() - start
    n_tokens = sum(len(r["response_ids"]) for r in rows)
    return (len(rows) == len(prompts) and n_tokens > 0,
            f"{len(rows)} prompts, {n_tokens} tokens in {seconds:.2f} s ({n_tokens / seconds:.0f} tok/s)",
            {"tok_s": n_tokens / seconds})


def inference_memory(case: ModelCase, fp32_runtime):
    """An inference model's weights in bf16 take half the fp32 weights' memory (GPU only)."""
    import torch

    from ibridge.models import load_model

    if case.runtime.device.type != "cuda" or fp32_runtime is None:
        raise Skipped("GPU bf16 only")
    sizes = {}
    for label, rt in (("bf16", case.runtime), ("fp32", fp32_runtime)):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        model = load_model(case.base, rt, for_inference=True)
        sizes[label] = (torch.cuda.memory_allocated() - before) / 2**20
        del model
        torch.cuda.empty_cache()
    ratio = sizes["bf16"] / sizes["fp32"]
    return (abs(ratio - 0.5) <= 0.05, f"bf16 {sizes['bf16']:.0f} MiB vs fp32 {sizes['fp32']:.0f} MiB: {ratio:.2f}x "
            "(expected 0.50)", {"ratio": ratio})


__all__ = ["OBJECTIVES", "generation", "inference_memory", "kind_of", "loss_parity", "reference_cache", "resume",
           "resume_gap", "steps"]
