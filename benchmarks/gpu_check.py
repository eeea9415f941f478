"""What only a GPU can show, ready to run on one GPU: bf16 steps, parity with fp32, memory,
resume, kl/token, the evaluation's fp32 scoring, LoRA over a bf16 base, FSDP2, NCCL.

    python benchmarks/gpu_check.py                        # on a CUDA machine (make gpu-check)
    python benchmarks/gpu_check.py --cpu --ranks 1 --json out.json   # fp32, small shapes (CI)

On two models, the toy base (debug=smoke world) and a randomly initialised model of
Qwen2.5-0.5B's shapes (Qwen2, 151,936-token vocabulary, 24 layers of 896, tied embeddings;
on CPU 2 layers of 64 with the same vocabulary), every section calls ibridge's own code
(encoding, the reference cache, `load_trainable`, `optimise` with the stages' objectives,
`token_kl`, `evaluate_checkpoint`, `ibridge.lora.merged`, `ibridge.distributed.shard`):

* **reference cache**: a cold pass (timed), then a hit returning the same values;
* **steps** of sft, jsd (token granularity) and dpo in the run's precision (bf16 on a GPU):
  tokens/s and peak memory (``max_memory_allocated`` on a GPU, peak RSS on the CPU);
* **loss parity** (GPU): the same steps in fp32; first step ``|bf16 - fp32| <= 0.02 |fp32| +
  0.01``, mean over the steps within 5%;
* **resume**: a stage stopped by SIGTERM after step 2 and run again ends with the weights of
  an uninterrupted stage, bit for bit, under deterministic algorithms;
* **generation**: `ibridge.evaluation.generate` on a few prompts, tokens/s;
* **bf16 inference memory** (GPU): an inference model's bf16 weights take half the fp32 ones;
* **token_kl**: `kl/token` as the SFT stage computes it, with the run's attention, against a
  float64 computation on unpadded eager-attention copies (within 1e-3 relative + 1e-6 nats);
* **evaluate_checkpoint** (toy): generation, the gold judge and the float32 scoring with the
  run's attention (flash-attn where installed), the model as its own reference:
  ``kl_to_ref`` 0 and ``implicit_reward_acc`` 0.5;
* **lora merge**: a LoRA stage (bf16 frozen base on a GPU), then the fp32 merge, against
  float64 from the files (1e-6 relative), and the share a bf16 merge would have kept;
* **gradient checkpointing**: the same weights as without (1e-5 of their scale), both peaks;
* **fsdp 1-rank**: FSDP2 on a process group of one rank (the one GPU), steps and a SIGTERM
  resume from the gathered state, bit for bit;
* **collectives**: `all_reduce_sum` and a DDP step over 2 ranks (NCCL; gloo with ``--cpu
  --ranks 2``); skipped, and said so, with one GPU or ``--ranks 1``.

Every section is independent: whatever it raises is its FAIL row, and the next one runs. The
JSON (``--json``) is rewritten after every row; the run ends with a one-screen verdict and
exits 1 if any section failed. Results for BENCHMARKS.md: run it on a GPU and paste the output.
"""

from __future__ import annotations

import argparse
import os
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
# Section keys for --skip, beside the model names toy and qwen.
SECTIONS = ("refcache", "steps", "parity", "resume", "generation", "memory", "token_kl", "evaluate", "lora", "gc",
            "fsdp", "collectives")


def toy_builder(runtime):
    def build():
        from benchlib.common import compose_cfg

        from ibridge.data import source_for
        from ibridge.models import ensure_toy_base

        cfg = compose_cfg(["debug=smoke", "eval.num_prompts=16", "eval.bootstrap_resamples=50"])
        source = source_for(cfg.data)
        base = ensure_toy_base(cfg.model, source.world_config, replace(runtime, precision="fp32",
                                                                        attn_implementation="eager"))
        data = {kind: source.examples(kind) for kind in ("demonstrations", "preferences")}
        return base, data, int(cfg.model.max_length), cfg
    return build


def qwen_builder(on_gpu: bool, work: Path):
    def build():
        from benchlib.synthetic import conversations, save_model

        arch = QWEN_GPU if on_gpu else QWEN_CPU
        base, n_params = save_model(work / "qwen", "qwen2", QWEN_VOCAB, arch)
        # CPU: short sequences (a 151,936-token vocabulary makes every scored row's logits large).
        max_length = 1024 if on_gpu else 64
        data = conversations(64 if on_gpu else 24, 32 if on_gpu else 12, QWEN_VOCAB, max_length,
                             *((90, 230) if on_gpu else (10, 24)))
        print(f"  qwen-shaped: Qwen2, vocabulary {QWEN_VOCAB:,}, {arch['num_hidden_layers']} layers of "
              f"{arch['hidden_size']}, {n_params:,} parameters, sequences up to {max_length} tokens", flush=True)
        return base, data, max_length, None
    return build


def run_model(case, report, skip: set, fp32_runtime, evaluate: bool, toy_only: set = frozenset()) -> None:
    """Every section on one model, each independent of the others; those in `toy_only` are
    skip rows (the CPU mode runs them on the toy model alone, to keep CI short)."""
    from benchlib import gpu_dist, gpu_sections, gpu_stages
    from benchlib.gpu_report import Skipped

    def on_toy_only():
        raise Skipped("CPU mode: on the toy model only (the same code path; a GPU run covers this model)")

    precision = case.runtime.precision
    plan = [("refcache", "reference cache", lambda: gpu_sections.reference_cache(case))]
    runs: dict = {}
    for objective in gpu_sections.OBJECTIVES:
        plan.append(("steps", f"{objective} steps ({precision})",
                     lambda o=objective: gpu_sections.steps(case, o, runs)))
        if fp32_runtime is not None:
            plan.append(("parity", f"{objective} bf16 vs fp32 loss",
                         lambda o=objective: gpu_sections.loss_parity(case, o, runs, fp32_runtime)))
    plan += [("resume", "resume after SIGTERM", lambda: gpu_sections.resume(case)),
             ("generation", "generation", lambda: gpu_sections.generation(case)),
             ("memory", "bf16 inference memory", lambda: gpu_sections.inference_memory(case, fp32_runtime)),
             ("token_kl", "token_kl", lambda: gpu_stages.token_kl_check(case))]
    if evaluate:
        plan.append(("evaluate", "evaluate_checkpoint", lambda: gpu_stages.evaluate_check(case)))
    plan += [("lora", "lora merge", lambda: gpu_stages.lora_check(case)),
             ("gc", "gradient checkpointing", lambda: gpu_stages.checkpointing_check(case)),
             ("fsdp", "fsdp 1-rank + resume", lambda: gpu_dist.fsdp_check(case))]
    for key, check, section in plan:
        if key not in skip:
            report.section(case.name, check, on_toy_only if key in toy_only else section)


def header(runtime, on_gpu: bool, ranks: int) -> dict:
    import torch
    import transformers

    try:
        import flash_attn

        flash = flash_attn.__version__
    except ImportError:
        flash = "not installed"
    gpu = torch.cuda.get_device_name(0) if on_gpu else "none"
    summary = (f"device {runtime.device} ({gpu}), precision {runtime.precision}, attention "
               f"{runtime.attn_implementation}, flash-attn {flash}; torch {torch.__version__}, transformers "
               f"{transformers.__version__}; {ranks} rank(s) for the collectives")
    return {"device": str(runtime.device), "gpu": gpu, "precision": runtime.precision,
            "attention": runtime.attn_implementation, "flash_attn": flash, "torch": torch.__version__,
            "transformers": transformers.__version__, "ranks": ranks, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU in fp32 at small shapes (what CI runs)")
    parser.add_argument("--ranks", type=int, choices=(1, 2), default=None,
                        help="processes for the collectives (default: min(2, GPUs); 2 with --cpu)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--skip", default="", help=f"comma-separated: toy, qwen, {', '.join(SECTIONS)}")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    # cuBLAS reads this at its first use: the resume checks run under deterministic algorithms.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    import torch
    from benchlib.common import compose_cfg
    from benchlib.gpu_dist import collectives_check
    from benchlib.gpu_model import ModelCase
    from benchlib.gpu_report import FAIL, Report

    from ibridge.runtime import resolve_runtime

    on_gpu = torch.cuda.is_available() and not args.cpu
    if not on_gpu:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ranks = args.ranks or (min(2, torch.cuda.device_count()) if on_gpu else 2)
    skip = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    runtime = resolve_runtime(compose_cfg([f"trainer.device={'cuda' if on_gpu else 'cpu'}",
                                           "trainer.precision=auto"]).trainer)
    fp32_runtime = replace(runtime, precision="fp32") if runtime.precision != "fp32" else None
    report = Report(header(runtime, on_gpu, ranks), args.json)
    print(f"gpu_check: {report.header['summary']}" + ("" if on_gpu else f"; CPU mode (fp32, small shapes), "
          f"{torch.get_num_threads()} thread(s)"), flush=True)
    start = time.perf_counter()
    try:
        if "toy" not in skip:
            toy = ModelCase("toy", toy_builder(runtime), runtime, work, args.steps, 16)
            run_model(toy, report, skip, fp32_runtime, evaluate=True)
        if "qwen" not in skip:
            qwen = ModelCase("qwen", qwen_builder(on_gpu, work), runtime, work, args.steps, 4 if on_gpu else 8)
            run_model(qwen, report, skip, fp32_runtime, evaluate=False,
                      toy_only=set() if on_gpu else {"gc", "fsdp"})
        if "collectives" not in skip:
            report.section("ddp", "collectives", lambda: collectives_check(ranks, on_gpu, work))
    except BaseException as err:  # the driver itself: still a row, a JSON and a verdict
        report.add("driver", "gpu_check", FAIL, f"{type(err).__name__}: {err}"[:300])
        if isinstance(err, KeyboardInterrupt):
            raise
    finally:
        report.write(seconds_total=round(time.perf_counter() - start, 1))
        print(report.verdict(), flush=True)
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
