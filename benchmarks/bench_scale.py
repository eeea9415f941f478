"""ibridge against TRL and a packed bare PyTorch loop at the paper's shapes, scaled to a CPU.

    python benchmarks/bench_scale.py [--repeats 2] [--quick] [--json FILE]

The paper's runs: a 128k-token vocabulary, conversations of hundreds to thousands of
tokens, bf16 attention kernels on GPUs. Here, what of that fits a shared 2-core CPU:

* **Model:** a Llama with Llama-3's vocabulary (128,256 tokens, untied embeddings as in
  Llama-3-8B) and two small layers (hidden 128, GQA 4/2 heads, MLP 384, rope theta
  500000), randomly initialised: 33.2M parameters, 99% of them in the embeddings and the
  head, so the vocabulary dominates a step as it does for 8B models on GPUs (where the
  head is ~6% of the FLOPs but most of the activation memory).
* **Data:** synthetic conversations of a word-level tokenizer with that vocabulary (Zipf
  word frequencies), with UltraChat-like lengths: prompts log-normal around 90 tokens,
  responses around 230, long-tailed, prompt + response up to 1024 tokens.
* **Precision:** fp32 (bf16 autocast is many times slower on this CPU; BENCHMARKS.md).
* **Each tool at its best settings here** (BENCHMARKS.md shows the alternatives tried):
  ibridge's defaults (trainer=auto: eager attention on CPU, padding-free packing, the
  chunked LM head past 256 MiB of logits); TRL with eager attention and, for SFT,
  ``padding_free=True`` (faster and lighter here); its DPOTrainer has no padding-free mode in
  1.16. TRL scores through its fused LM head (no logits materialised) either way.
* **The ceiling:** a bare loop over exactly ibridge's batches, packed as ibridge packs
  them: forward, the same chunked head at scored tokens (ibridge/lmhead.py), cross-entropy
  (SFT) or the DPO loss on precomputed reference log-probs, backward, clipping, AdamW;
  nothing else. ``--full-logits-bare`` adds the loop a plain PyTorch user writes (the
  model's full logits and ``F.cross_entropy``), which is 3-5x slower here.

Printed: tok/s over the whole stage (tokenisation, reference pass, setup, training) and
over the optimisation steps, peak RSS, the ratios against the targets, the correctness
check (ibridge's DPO and SFT losses against TRL's on identical batches, through every
forward the loop can take), and the memory model of docs/memory.md against the measured
growth. The targets read medians (the machine is shared; best runs are printed beside).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchlib.common import ROOT, Spec, cpu_name, require_trl  # noqa: E402
from benchlib.driver import (  # noqa: E402
    Targets,
    print_breakdown,
    print_check,
    print_table,
    run_interleaved,
    spawn,
    summarise,
    worker_main,
)
from benchlib.memory import reference_pass_peak, training_peak  # noqa: E402
from benchlib.synthetic import conversations, save_model, write_data  # noqa: E402
from benchlib.trl_check import worker_check  # noqa: E402
from benchlib.workers import WORKERS  # noqa: E402

WORKERS = {**WORKERS, "check": worker_check}

VOCAB = 128_256  # Llama-3
ARCH = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 2048, "rope_theta": 500_000.0,
        "tie_word_embeddings": False}
MAX_LENGTH = 1024
DPO_CONFIGS = ["trl_dpo", "trl_dpo_precompute", "ibridge_dpo", "bare_chunked_dpo"]
SFT_CONFIGS = ["trl_sft", "ibridge_sft", "bare_chunked_sft"]


def build_world(work: Path, n_sft: int, n_dpo: int, seed: int = 0) -> tuple[Path, Path, int]:
    """The model folder (weights and tokenizer) and the data file; returns them and the parameter count."""
    base, n_params = save_model(work / "model", "llama", VOCAB, ARCH, seed)
    data = write_data(work / "data.json", conversations(n_sft, n_dpo, VOCAB, MAX_LENGTH, seed=seed))
    return base, data, n_params


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Sized for ~10 minutes on a shared 2-core CPU, where TRL's DPO runs at 25-30 tok/s.
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of every configuration")
    parser.add_argument("--close-repeats", type=int, default=4,
                        help="runs of ibridge and the bare chunked-head loop, whose ratio is close (TRL's is not)")
    parser.add_argument("--sft-steps", type=int, default=2)
    parser.add_argument("--dpo-steps", type=int, default=2)
    parser.add_argument("--sft-batch", type=int, default=4, help="conversations per SFT step")
    parser.add_argument("--dpo-batch", type=int, default=2, help="pairs per DPO step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every run (0: torch's default)")
    parser.add_argument("--ibridge-attn", default="sdpa", help="trainer.attn_implementation for ibridge")
    parser.add_argument("--trl-attn", default="sdpa", help="attn_implementation TRL's models load with")
    parser.add_argument("--trl-sft-padding-free", type=int, default=1, help="TRL SFTConfig(padding_free=...)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: dpo,sft,check")
    parser.add_argument("--full-logits-bare", action="store_true",
                        help="also run the bare loop with full logits and cross-entropy (slow: ~100 s a run here)")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 1 step of 2 conversations / 1 pair each: "
                        "a smoke test of the script")
    parser.add_argument("--json", type=Path, default=None, help="also write every raw result here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def _print_setting(trl, args, n_params: int) -> None:
    """The versions, machine, model and settings every figure below was measured with."""
    import torch
    import transformers

    print(f"ibridge vs TRL {trl.__version__} at realistic shapes | torch {torch.__version__}, transformers "
          f"{transformers.__version__} | {os.cpu_count()} CPUs ({cpu_name()}), torch threads "
          f"{args.threads or torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at the start")
    print(f"model: Llama, vocabulary {VOCAB:,}, {ARCH['num_hidden_layers']} layers, hidden {ARCH['hidden_size']}, "
          f"{n_params:,} parameters (random init); data: {args.sft_steps * args.sft_batch} demonstrations, "
          f"{args.dpo_steps * args.dpo_batch} preference pairs, UltraChat-like lengths, max_length {MAX_LENGTH}")
    print(f"settings: fp32; SFT {args.sft_steps} steps x {args.sft_batch} conversations, DPO {args.dpo_steps} steps "
          f"x {args.dpo_batch} pairs (beta 0.1), cosine schedule, warmup 0.1, max_grad_norm 1, no eval, no "
          f"checkpoints; ibridge trainer.attn_implementation={args.ibridge_attn}; TRL attention {args.trl_attn}, "
          f"SFT padding_free={bool(args.trl_sft_padding_free)}")
    print(f"each configuration in its own process, {args.repeats} interleaved repeats (ibridge and the chunked-head "
          f"bare loop {max(args.repeats, args.close_repeats)}); targets from medians, best runs beside", flush=True)


def _speed_section(stats: dict, tables: dict, skip: set[str]) -> bool:
    """The DPO and SFT tables against TRL and the chunked-head bare loop, and their targets (medians)."""
    targets = Targets("median")
    if "dpo" not in skip:
        print_table("DPO (whole stage includes tokenisation and the reference pass)", tables["dpo"], stats)
        print_breakdown(tables["dpo"], stats)
        ours = stats["ibridge_dpo"]
        faster = max(("trl_dpo", "trl_dpo_precompute"), key=lambda name: stats[name]["whole_median"])
        which = "on the fly" if faster == "trl_dpo" else "precomputed reference"
        targets.throughput(f"ibridge DPO / TRL's faster DPO ({which}), whole stage", ours, stats[faster], "whole", 1.3)
        targets.throughput("ibridge DPO / bare loop, same chunked head (steps)", ours, stats["bare_chunked_dpo"],
                           "steps", 0.9)
        targets.memory(f"ibridge DPO peak RSS / TRL ({which})", ours, stats[faster], 0.7)
    if "sft" not in skip:
        print_table("SFT", tables["sft"], stats)
        print_breakdown(tables["sft"], stats)
        ours = stats["ibridge_sft"]
        targets.throughput("ibridge SFT / TRL SFT (whole stage)", ours, stats["trl_sft"], "whole", 1.3)
        targets.throughput("ibridge SFT / bare loop, same chunked head (steps)", ours, stats["bare_chunked_sft"],
                           "steps", 0.9)
        targets.memory("ibridge SFT peak RSS / TRL SFT", ours, stats["trl_sft"], 0.7)
    targets.print("ratios of medians; best runs in brackets; 'within 10% of the bare loop' read as >= 0.90x")
    return targets.ok


def main() -> None:
    args = _parser().parse_args()
    if args.worker:
        return worker_main(args, WORKERS)
    if args.quick:
        args.repeats, args.close_repeats, args.sft_steps, args.dpo_steps, args.sft_batch, args.dpo_batch = 1, 1, 1, 1, 2, 1

    trl = require_trl("bench_scale.py")
    script = Path(__file__).resolve()
    skip = set(filter(None, args.skip.split(",")))
    wall = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    base, data, n_params = build_world(work, args.sft_steps * args.sft_batch, args.dpo_steps * args.dpo_batch)

    def opt(lr: float, steps: int, batch: int, **extra) -> dict:
        return {"lr": lr, "steps": steps, "batch_size": batch, "weight_decay": 0.0, "max_grad_norm": 1.0,
                "log_every": steps, **extra}

    spec = Spec(base=str(base), data=str(data), max_length=MAX_LENGTH, seed=0, threads=args.threads,
                overrides=[f"trainer.attn_implementation={args.ibridge_attn}", "trainer=cpu"],
                warmup_ratio=0.1, schedule="cosine",
                sft=opt(2e-5, args.sft_steps, args.sft_batch), dpo=opt(5e-7, args.dpo_steps, args.dpo_batch, beta=0.1),
                trl={"attn_implementation": args.trl_attn, "sft_padding_free": bool(args.trl_sft_padding_free)},
                check={"batches": 2, "batch_size": 2, "perturb_steps": 2})
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps(spec))
    _print_setting(trl, args, n_params)
    extra = {"dpo": ["bare_dpo"], "sft": ["bare_sft"]} if args.full_logits_bare else {"dpo": [], "sft": []}
    tables = {"dpo": DPO_CONFIGS + extra["dpo"], "sft": SFT_CONFIGS + extra["sft"]}
    configs = [name for kind in ("dpo", "sft") if kind not in skip for name in tables[kind]]
    close = {name: max(args.repeats, args.close_repeats) for name in
             ("ibridge_dpo", "bare_chunked_dpo", "ibridge_sft", "bare_chunked_sft")}
    runs = run_interleaved(script, configs, spec_file, args.repeats, wall, more=close)
    stats = {name: summarise(r) for name, r in runs.items() if r}
    raw: dict = {"spec": spec, "runs": runs, "parameters": n_params}
    all_ok = _speed_section(stats, tables, skip)
    all_ok &= print_memory_model(runs, n_params, raw)

    if "check" not in skip:
        raw["check"] = check = spawn(script, "check", spec_file)
        all_ok &= print_check(check, 1e-4)

    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))
    print(f"\n{'all targets met' if all_ok else 'some targets MISSED'}; benchmark wall time "
          f"{time.perf_counter() - wall:.0f} s")


def print_memory_model(runs: dict, n_params: int, raw: dict) -> bool:
    """docs/memory.md's prediction for each ibridge run against its measured growth over the memory
    before the model (training loop; DPO: the reference pass too); median ratio within 20%."""
    import statistics

    ok = True
    lines = []
    for kind in ("sft", "dpo"):
        for phase in ("training", "reference pass"):
            ratios, shown = [], None
            for run in runs.get(f"ibridge_{kind}", []):
                big = run["largest"]
                if phase == "training":
                    model = training_peak(n_params, VOCAB, ARCH, run["attn_implementation"], big["tokens"],
                                          big["scored"], big["row_width"])
                    measured = run["peak_training_mb"] - run["rss_before_model_mb"]
                elif "reference_batch" in big:
                    model = reference_pass_peak(n_params, VOCAB, ARCH, big["reference_tokens"],
                                                big["reference_scored"])
                    measured = run["peak_reference_mb"] - run["rss_data_mb"]
                else:
                    continue
                ratios.append(model["total_mb"] / measured)
                shown = shown or (model, measured, big)
            if not ratios:
                continue
            ratio = statistics.median(ratios)
            fine = 0.8 <= ratio <= 1.2
            ok &= fine
            model, measured, big = shown
            raw.setdefault("memory_model", {})[f"{kind} {phase}"] = {"model": model, "measured": measured,
                                                                      "ratios": ratios}
            parts = ", ".join(f"{k} {v:.0f}" for k, v in model["parts"].items())
            where = f" ({model['phase']})" if "phase" in model else ""
            batch = (f"largest micro-batch {big['tokens']} tokens, {big['scored']} scored, rows of {big['row_width']}"
                     if phase == "training" else
                     f"largest reference batch {big['reference_tokens']} tokens ({big['reference_batch']} padded), "
                     f"{big['reference_scored']} scored")
            lines.append(f"  ibridge {kind.upper()} {phase}{where}: predicted {model['total_mb']:.0f} MiB = {parts}; "
                         f"measured {measured:.0f} MiB ({batch}); "
                         f"predicted/measured {ratio:.2f} (median of {len(ratios)}; target 0.80-1.20) "
                         f"{'ok' if fine else 'MISSED'}")
    if lines:
        print("\nMemory model (docs/memory.md): peak growth over the resident memory before the phase, MiB "
              "(training: before the model is loaded; reference pass: after tokenisation)")
        print("\n".join(lines))
    return ok


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
