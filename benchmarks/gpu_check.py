"""What only a GPU can show, ready to run: bf16 steps, parity with fp32, memory, NCCL.

    python benchmarks/gpu_check.py            # on a CUDA machine (make gpu-check)
    python benchmarks/gpu_check.py --cpu      # the same steps in fp32 on the CPU, small shapes (CI, < 2 min)

On each of two models, the toy base (debug=smoke world) and a randomly initialised model
of Qwen2.5-0.5B's shapes (Qwen2, 151,936-token vocabulary, 24 layers of 896, tied
embeddings; on CPU 2 layers of 64 with the same vocabulary), through ibridge's own code
(encoding, the reference cache, `ibridge.training.optimise` with the stages' objectives):

* **steps**: a few optimiser steps of sft, jsd (token granularity) and dpo in the run's
  precision (bf16 autocast on a GPU): tokens/s and peak memory (``max_memory_allocated`` on
  a GPU, peak RSS on the CPU);
* **loss parity** (GPU): the same steps again in fp32; the first step (same weights, same
  batch) must agree within ``|bf16 - fp32| <= 0.02 |fp32| + 0.01``, the mean loss over the
  steps within 5% (bf16 keeps 8 bits of mantissa: 0.4% per rounding; the log-softmax and the
  losses are float32 in both);
* **reference cache**: a cold pass (timed) then a hit returning the same values;
* **resume**: a stage stopped by SIGTERM after step 2 and resumed ends with the weights of
  an uninterrupted stage (CPU: bit for bit; GPU: within 1e-5 of the weights' scale);
* **generation**: `ibridge.evaluation.generate` on a few prompts, tokens/s;
* **bf16 inference memory** (GPU): the reference/eval model loaded for inference in bf16
  takes half the fp32 weights' memory (checked within 10%);
* **collectives**: `ibridge.distributed.all_reduce_sum` and one DDP step over
  ``min(2, GPUs)`` NCCL ranks on device tensors (2 gloo ranks on the CPU); the ranks' gradients
  must agree.

Prints one line per check and a summary; exits 1 if any check fails. Results for
BENCHMARKS.md: run it on a GPU and paste the output (with ``--json FILE`` for the raw figures).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

QWEN_GPU = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2, "max_position_embeddings": 32768, "rope_theta": 1_000_000.0,
            "tie_word_embeddings": True}
QWEN_CPU = {**QWEN_GPU, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 2048}
QWEN_VOCAB = 151_936
OBJECTIVES = {"sft": {"name": "sft"}, "jsd": {"name": "jsd", "granularity": "token"}, "dpo": {"name": "dpo", "beta": 0.1}}
FIRST_STEP_TOL = (0.02, 0.01)  # |bf16 - fp32| <= rel * |fp32| + abs, first step
MEAN_LOSS_TOL = 0.05  # relative, mean over the steps


class Report:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, model: str, check: str, ok: bool, detail: str, **figures) -> None:
        self.rows.append({"model": model, "check": check, "ok": bool(ok), "detail": detail, **figures})
        print(f"  [{'ok' if ok else 'FAIL'}] {model:<10} {check:<26} {detail}", flush=True)


# --------------------------------------------------------------------------- memory and timing


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")


def peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM")) / 1024


# --------------------------------------------------------------------------- one model's checks


def encoded_splits(base: Path, data: dict, max_length: int):
    from transformers import PreTrainedTokenizerFast

    from ibridge.data.formatting import encode_split, prepare_tokenizer

    # The tokenizer as saved: AutoTokenizer would give a Qwen2 config Qwen's own BPE class,
    # which rebuilds the word-level test tokenizer into something else.
    tokenizer = prepare_tokenizer(PreTrainedTokenizerFast.from_pretrained(base))
    return tokenizer, {kind: encode_split(tokenizer, data[kind], kind, max_length)[0]
                       for kind in ("demonstrations", "preferences")}


def with_reference(encoded: dict, kind: str, base: Path, runtime, pad: int, cache: Path) -> list:
    """A copy of the split with reference log-probs from the cache at `cache` (ibridge/refcache.py)."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from ibridge.stages import attach_reference

    items = [dict(e) for e in encoded[kind]]
    ctx = SimpleNamespace(cfg=OmegaConf.create({"model": {"cache_dir": str(cache)}}), runtime=runtime)
    attach_reference(items, kind, base, ctx, pad)
    return items


def train(base: Path, items: list, objective_cfg: dict, runtime, pad: int, steps: int, batch: int,
          state_dir: Path | None = None, stop_after: int = 0) -> dict:
    """`steps` optimiser steps as a stage runs them; per-step losses, tokens/s, peak memory, final weights."""

    from ibridge.data.collate import collate_demonstrations, collate_pairs
    from ibridge.models import load_model
    from ibridge.objectives import build_objective
    from ibridge.stages import demonstration_step, loss_units, preference_step
    from ibridge.training import OptimSettings, optimise

    objective = build_objective(objective_cfg)
    demos = objective.data_kind == "demonstrations"
    collate = collate_demonstrations if demos else collate_pairs
    losses: list[float] = []

    def log(metrics: dict, step: int) -> None:
        if "train/loss" in metrics:
            losses.append(metrics["train/loss"])
        if stop_after and step == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop saves at the next logging step and stops

    model = load_model(base, runtime)
    reset_peak(runtime.device)
    start = time.perf_counter()
    settings = OptimSettings(lr=1e-4 if demos else 5e-6, max_steps=steps, batch_size=batch, log_every=1,
                             warmup_ratio=0.0, seed=0)
    summary = optimise(model, items, lambda chunk: collate(chunk, pad),
                       demonstration_step(objective) if demos else preference_step(objective), settings, runtime,
                       log=log, state_dir=state_dir, count_units=loss_units(objective))
    seconds = time.perf_counter() - start
    return {"losses": losses, "tok_s": summary.tokens / seconds, "tokens": summary.tokens, "seconds": seconds,
            "peak_mb": peak_mb(runtime.device),
            "weights": {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}}


def check_model(name: str, base: Path, data: dict, runtime, fp32_runtime, report: Report, steps: int, batch: int,
                max_length: int, work: Path) -> None:
    import torch

    from ibridge.evaluation.generate import generate
    from ibridge.models import load_model
    from ibridge.refcache import cached_reference_logps
    from ibridge.training import StopRequested

    tokenizer, encoded = encoded_splits(base, data, max_length)
    pad = tokenizer.pad_token_id
    cache = work / f"cache-{name}"
    on_gpu = runtime.device.type == "cuda"

    # Reference cache: cold pass, then a hit with the same values.
    sequences = encoded["demonstrations"]
    start = time.perf_counter()
    cold = cached_reference_logps(base, sequences, runtime, pad, cache)
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    warm = cached_reference_logps(base, sequences, runtime, pad, cache)
    warm_s = time.perf_counter() - start
    same = all(torch.equal(a, b) for a, b in zip(cold, warm, strict=True))
    report.add(name, "reference cache", same and warm_s < cold_s,
               f"cold pass {cold_s:.2f} s ({sum(len(s['input_ids']) for s in sequences)} tokens), hit {warm_s:.2f} s, "
               f"same values: {same}", cold_s=cold_s, warm_s=warm_s)

    items = {"demonstrations": with_reference(encoded, "demonstrations", base, runtime, pad, cache),
             "preferences": with_reference(encoded, "preferences", base, runtime, pad, cache)}
    fp32_items = items if fp32_runtime is None else {
        kind: with_reference(encoded, kind, base, fp32_runtime, pad, work / f"cache-{name}-fp32") for kind in items}

    # Steps, throughput, memory; on a GPU the same steps in fp32 for loss parity.
    for objective, cfg in OBJECTIVES.items():
        kind = "preferences" if objective == "dpo" else "demonstrations"
        run = train(base, items[kind], cfg, runtime, pad, steps, batch)
        finite = all(math.isfinite(x) for x in run["losses"])
        report.add(name, f"{objective} steps ({runtime.precision})", finite and len(run["losses"]) == steps,
                   f"{steps} steps, {run['tok_s']:.0f} tok/s, peak {run['peak_mb']:.0f} MiB, losses "
                   + " ".join(f"{x:.4f}" for x in run["losses"]), tok_s=run["tok_s"], peak_mb=run["peak_mb"],
                   losses=run["losses"])
        if fp32_runtime is not None:
            ref = train(base, fp32_items[kind], cfg, fp32_runtime, pad, steps, batch)
            first, first32 = run["losses"][0], ref["losses"][0]
            mean, mean32 = sum(run["losses"]) / steps, sum(ref["losses"]) / steps
            ok = abs(first - first32) <= FIRST_STEP_TOL[0] * abs(first32) + FIRST_STEP_TOL[1] and \
                abs(mean - mean32) <= MEAN_LOSS_TOL * abs(mean32)
            report.add(name, f"{objective} bf16 vs fp32 loss", ok,
                       f"first step {first:.4f} vs {first32:.4f}, mean {mean:.4f} vs {mean32:.4f} (fp32 "
                       f"{ref['tok_s']:.0f} tok/s, peak {ref['peak_mb']:.0f} MiB)", fp32_losses=ref["losses"])

    # One resume: SIGTERM after step 2, the same call again, against an uninterrupted stage.
    state = work / f"state-{name}"
    whole = train(base, items["demonstrations"], OBJECTIVES["sft"], runtime, pad, steps, batch)
    stopped = False
    try:
        train(base, items["demonstrations"], OBJECTIVES["sft"], runtime, pad, steps, batch, state_dir=state,
              stop_after=2)
    except StopRequested:
        stopped = True
    resumed = train(base, items["demonstrations"], OBJECTIVES["sft"], runtime, pad, steps, batch, state_dir=state)
    gap = max(float((whole["weights"][k] - resumed["weights"][k]).abs().max()) for k in whole["weights"])
    scale = max(float(v.abs().max()) for v in whole["weights"].values())
    tolerance = 1e-5 * scale if on_gpu else 0.0
    report.add(name, "resume after SIGTERM", stopped and gap <= tolerance,
               f"SIGTERM at step 2, stopped and saved: {stopped}; max |W_resumed - W_uninterrupted| {gap:.1e} (tolerance "
               f"{tolerance:.0e})", gap=gap)

    # Generation through the eval job's code.
    model = load_model(base, runtime, for_inference=True)
    prompts = [d["prompt"] for d in data["demonstrations"][:8]]
    start = time.perf_counter()
    rows = generate(model, tokenizer, prompts, runtime, max_new_tokens=32, batch_size=8)
    seconds = time.perf_counter() - start
    n_tokens = sum(len(r["response_ids"]) for r in rows)
    report.add(name, "generation", len(rows) == len(prompts) and n_tokens > 0,
               f"{len(rows)} prompts, {n_tokens} tokens in {seconds:.2f} s ({n_tokens / seconds:.0f} tok/s)",
               tok_s=n_tokens / seconds)
    del model

    # bf16 inference memory: the weights of an inference model against fp32 ones.
    if on_gpu:
        sizes = {}
        for label, rt in (("bf16", runtime), ("fp32", fp32_runtime)):
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            model = load_model(base, rt, for_inference=True)
            sizes[label] = (torch.cuda.memory_allocated() - before) / 2**20
            del model
            torch.cuda.empty_cache()
        ratio = sizes["bf16"] / sizes["fp32"]
        report.add(name, "bf16 inference memory", abs(ratio - 0.5) <= 0.05,
                   f"bf16 {sizes['bf16']:.0f} MiB vs fp32 {sizes['fp32']:.0f} MiB: {ratio:.2f}x (expected 0.50)")


# --------------------------------------------------------------------------- collectives


def _rank(rank: int, world: int, store: str, on_gpu: bool, out: str) -> None:
    import torch
    import torch.distributed as dist

    from ibridge.distributed import DistInfo, all_reduce_sum, process_group_backend, wrap

    torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank}" if on_gpu else "cpu")
    if on_gpu:
        torch.cuda.set_device(rank)
    # A file store: a TCP store lives in rank 0, and a rank still leaving after rank 0 has gone aborts.
    dist.init_process_group(process_group_backend(device.type), init_method=f"file://{store}", rank=rank,
                            world_size=world)
    info = DistInfo(rank=rank, world_size=world, mode="ddp", collective_device=str(device) if on_gpu else "cpu")
    sums = all_reduce_sum([rank + 1.0, 2.0], info)
    torch.manual_seed(0)
    model = wrap(torch.nn.Linear(8, 4), info, device)
    x = torch.randn(16, 8, device=device) * (rank + 1)  # different data per rank
    model(x).pow(2).mean().backward()
    grad = model.module.weight.grad.detach().clone()
    gathered = [torch.zeros_like(grad) for _ in range(world)]
    dist.all_gather(gathered, grad)
    agree = all(torch.equal(g, gathered[0]) for g in gathered)
    if rank == 0:
        Path(out).write_text(json.dumps({"sums": sums, "expected": [world * (world + 1) / 2, 2.0 * world],
                                         "backend": dist.get_backend(), "grads_agree": agree}))
    dist.barrier()
    dist.destroy_process_group()


def check_collectives(report: Report, on_gpu: bool, work: Path) -> None:
    import torch
    import torch.multiprocessing as mp

    world = min(2, torch.cuda.device_count()) if on_gpu else 2
    out = work / "collectives.json"
    start = time.perf_counter()
    mp.spawn(_rank, args=(world, str(work / "store"), on_gpu, str(out)), nprocs=world, join=True)
    result = json.loads(out.read_text())
    ok = result["sums"] == result["expected"] and result["grads_agree"]
    report.add("ddp", f"collectives ({result['backend']})", ok,
               f"{world} rank(s): all_reduce_sum {result['sums']} (expected {result['expected']}), DDP gradients "
               f"agree across ranks: {result['grads_agree']} ({time.perf_counter() - start:.1f} s)")


# --------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU in fp32 at small shapes (what CI runs)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--skip", default="", help="comma-separated: toy,qwen,collectives")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch
    import transformers
    from benchlib.common import compose_cfg
    from benchlib.synthetic import conversations, save_model

    from ibridge.data import source_for
    from ibridge.models import ensure_toy_base
    from ibridge.runtime import resolve_runtime

    on_gpu = torch.cuda.is_available() and not args.cpu
    if not on_gpu:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    skip = set(filter(None, args.skip.split(",")))
    wall = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    device = "cuda" if on_gpu else "cpu"
    runtime = resolve_runtime(compose_cfg([f"trainer.device={device}", "trainer.precision=auto"]).trainer)
    fp32_runtime = replace(runtime, precision="fp32") if runtime.precision != "fp32" else None
    gpu = torch.cuda.get_device_name(0) if on_gpu else "none"
    print(f"gpu_check: device {runtime.device} ({gpu}), precision {runtime.precision}, attention "
          f"{runtime.attn_implementation}; torch {torch.__version__}, transformers {transformers.__version__}"
          + ("" if on_gpu else f"; CPU mode (fp32, small shapes), {torch.get_num_threads()} thread(s)"), flush=True)
    report = Report()
    if "toy" not in skip:
        cfg = compose_cfg(["debug=smoke"])
        source = source_for(cfg.data)
        base = ensure_toy_base(cfg.model, source.world_config, replace(runtime, precision="fp32",
                                                                        attn_implementation="eager"))
        data = {kind: source.examples(kind) for kind in ("demonstrations", "preferences")}
        check_model("toy", base, data, runtime, fp32_runtime, report, args.steps, 16, int(cfg.model.max_length), work)
    if "qwen" not in skip:
        arch = QWEN_GPU if on_gpu else QWEN_CPU
        base, n_params = save_model(work / "qwen", "qwen2", QWEN_VOCAB, arch)
        # CPU: short sequences, since ibridge's reference pass holds the logits of a whole batch
        # (padded tokens x 151,936 floats; docs/memory.md).
        max_length = 1024 if on_gpu else 64
        data = conversations(64 if on_gpu else 24, 32 if on_gpu else 12, QWEN_VOCAB, max_length,
                             *((90, 230) if on_gpu else (10, 24)))
        print(f"  qwen-shaped: Qwen2, vocabulary {QWEN_VOCAB:,}, {arch['num_hidden_layers']} layers of "
              f"{arch['hidden_size']}, {n_params:,} parameters, sequences up to {max_length} tokens", flush=True)
        check_model("qwen", base, data, runtime, fp32_runtime, report, args.steps, 4 if on_gpu else 8, max_length,
                    work)
    if "collectives" not in skip:
        check_collectives(report, on_gpu, work)
    failed = [row for row in report.rows if not row["ok"]]
    print(f"\n{len(report.rows) - len(failed)}/{len(report.rows)} checks passed in {time.perf_counter() - wall:.0f} s"
          + ("" if not failed else ": FAILED " + ", ".join(f"{r['model']} {r['check']}" for r in failed)))
    if args.json:
        args.json.write_text(json.dumps({"device": str(runtime.device), "gpu": gpu, "precision": runtime.precision,
                                         "rows": report.rows, "seconds": time.perf_counter() - wall}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
