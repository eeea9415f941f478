"""ibridge against TRL and a bare PyTorch loop, on the same toy model, data and settings.

    python benchmarks/bench_trl.py [--repeats 3] [--sft-steps N] [--dpo-steps N] [overrides ...]

Needs the `bench` extra (TRL); the ibridge package itself never imports TRL. The workers,
timing and tables are benchmarks/benchlib (shared with benchmarks/bench_scale.py).

Each configuration runs in a fresh subprocess (so peak memory is its own), interleaved
and repeated `--repeats` times (the machine is shared: the targets use the best run of
each configuration, the fastest being the least disturbed; medians are printed beside):

* DPO: TRL's DPOTrainer with its default on-the-fly reference model, TRL with
  ``precompute_ref_log_probs=True``, ibridge's DPO stage (cold reference cache: the
  reference pass is done and timed), and a bare loop;
* SFT: TRL's SFTTrainer, ibridge's sft stage, and a bare loop.

Same base model (the toy Llama), tokenizer, examples (the exact token sequences are
checked to be identical), sequence lengths, batch size, number of steps, lr, cosine
schedule with warmup, gradient clipping, fp32 everywhere, eager attention everywhere
(ibridge's CPU default; TRL's models are loaded with it too), gradient checkpointing off,
no evaluation, no checkpoints, TRL logging once per run. The bare loop runs exactly
ibridge's batches, packed as ibridge packs them, with plain PyTorch: forward, loss,
backward, gradient clipping, AdamW step, nothing else.

Also, in the same run: the correctness check (ibridge's DPO loss and reward metrics
against TRL's on identical batches, to 1e-5; the SFT loss too), what TRL does with its own
defaults on this machine (a few steps), every f-divergence objective's step against an
sft step (benchmarks/bench_objectives.py), and generation speed of the eval job against
plain `model.generate`, plus the default world's whole eval time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchlib.common import ROOT, Spec, compose_cfg, cpu_name, require_trl  # noqa: E402
from benchlib.driver import (  # noqa: E402
    Targets,
    fmt_rate,
    print_breakdown,
    print_check,
    print_table,
    rates,
    run_interleaved,
    spawn,
    summarise,
    worker_main,
)
from benchlib.trl_check import worker_check  # noqa: E402
from benchlib.workers import DPO_CONFIGS, SFT_CONFIGS, WORKERS, runtime_for  # noqa: E402


def worker_generation(spec) -> dict:
    """Eval-job generation (ibridge.evaluation.generate) against plain model.generate, same prompts; whole eval."""
    import torch

    cfg, runtime = runtime_for(spec)
    from ibridge.data import source_for
    from ibridge.data.formatting import prompt_ids
    from ibridge.evaluation.evaluate import evaluate_checkpoint
    from ibridge.evaluation.generate import generate
    from ibridge.models import load_model, load_tokenizer

    source = source_for(cfg.data)
    tokenizer = load_tokenizer(spec.base)
    model = load_model(spec.base, runtime)
    ev = cfg.eval
    examples = source.examples("eval")
    if ev.num_prompts > 0:
        examples = examples[: ev.num_prompts]
    prompts = [e["prompt"] for e in examples]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def count(rows):
        return sum(tokens.index(eos) + 1 if eos in tokens else sum(t != pad for t in tokens) for tokens in rows)

    def plain():
        # The prompts as given, left-padded, in order, `eval.batch_size` at a time: one model.generate each.
        encoded = [prompt_ids(tokenizer, p) for p in prompts]
        rows = []
        with torch.no_grad():
            for start in range(0, len(encoded), ev.batch_size):
                chunk = encoded[start : start + ev.batch_size]
                width = max(map(len, chunk))
                ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk])
                mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(c) for c in chunk])[:, None]).long()
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=ev.max_new_tokens,
                                     do_sample=False, pad_token_id=pad, eos_token_id=eos)
                rows += out[:, width:].tolist()
        return count(rows)

    def ours():
        rows = generate(model, tokenizer, prompts, runtime, ev.max_new_tokens, ev.batch_size, desc="generate")
        return count([r["response_ids"] for r in rows])

    timings = {"plain": [], "ibridge": []}
    tokens = {}
    for _ in range(spec.gen_repeats):
        for name, fn in (("plain", plain), ("ibridge", ours)):
            start = time.perf_counter()
            tokens[name] = fn()
            timings[name].append(time.perf_counter() - start)
    out_dir = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    start = time.perf_counter()
    evaluate_checkpoint(cfg, source, Path(spec.base), Path(spec.base), runtime, out_dir, generator="base")
    return {"prompts": len(prompts), "max_new_tokens": int(ev.max_new_tokens), "batch_size": int(ev.batch_size),
            "tokens": tokens, "times": timings, "eval_s": time.perf_counter() - start}


WORKERS = {**WORKERS, "check": worker_check, "generation": worker_generation}


def toy_spec(args, work: Path) -> Spec:
    """The default toy world's base model, data and stage settings, as every worker gets them."""
    from ibridge.data import source_for
    from ibridge.models import ensure_toy_base
    from ibridge.runtime import resolve_runtime

    cfg = compose_cfg(args.overrides)
    runtime = resolve_runtime(cfg.trainer)
    if runtime.device.type != "cpu" or runtime.precision != "fp32":
        print(f"note: ibridge resolved device={runtime.device}, precision={runtime.precision}; "
              "this benchmark is written for the fp32 CPU comparison")
    source = source_for(cfg.data)
    base = ensure_toy_base(cfg.model, source.world_config, runtime)
    keep = {"demonstrations": ("prompt", "response"), "preferences": ("prompt", "chosen", "rejected")}
    data = {kind: [{k: e[k] for k in fields} for e in source.examples(kind)] for kind, fields in keep.items()}
    (work / "data.json").write_text(json.dumps(data))

    def opt(opt_cfg, lr, override: int, n: int, **extra):
        steps = override or int(opt_cfg.max_steps)
        if steps <= 0:
            steps = int(opt_cfg.epochs) * math.ceil(n / (int(opt_cfg.batch_size) * int(opt_cfg.grad_accum)))
        return {"lr": float(lr), "steps": steps, "batch_size": int(opt_cfg.batch_size),
                "weight_decay": float(opt_cfg.weight_decay), "max_grad_norm": float(opt_cfg.max_grad_norm),
                "log_every": int(opt_cfg.log_every), **extra}

    return Spec(base=str(base), data=str(work / "data.json"), overrides=list(args.overrides),
                max_length=int(cfg.model.max_length), seed=int(cfg.seed), threads=args.threads,
                warmup_ratio=float(cfg.schedule.warmup_ratio), schedule=str(cfg.schedule.name),
                sft=opt(cfg.sft, cfg.lr, args.sft_steps, len(data["demonstrations"])), gen_repeats=5,
                dpo=opt(cfg.dpo, cfg.dpo.lr, args.dpo_steps, len(data["preferences"]),
                        beta=float(cfg.dpo.objective.get("beta", 0.1))),
                trl={"attn_implementation": "eager", "sft_padding_free": False},
                check={"batches": 8, "batch_size": int(cfg.dpo.batch_size), "perturb_steps": 20},
                n_sft=len(data["demonstrations"]), n_dpo=len(data["preferences"]))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of every configuration (median)")
    parser.add_argument("--sft-steps", type=int, default=0, help="optimisation steps of the SFT runs (0: the stage's)")
    parser.add_argument("--dpo-steps", type=int, default=0, help="optimisation steps of the DPO runs (0: the stage's)")
    parser.add_argument("--default-steps", type=int, default=4, help="steps of the TRL-defaults runs (0: skip)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in every run (0: torch's default). 1 by default: on a shared 2-core "
                        "machine a two-thread run slows down many times over whenever another process runs")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: "
                        "dpo,sft,check,defaults,objectives,generation")
    parser.add_argument("--objective-steps", type=int, default=60)  # 30 steps (~0.7 s) proved too noisy
    parser.add_argument("--json", type=Path, default=None, help="also write every raw result here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. debug=smoke")
    return parser


def _print_setting(trl, spec: Spec, args) -> None:
    """The versions, machine and settings every figure below was measured with."""
    import torch
    import transformers

    print(f"ibridge vs TRL {trl.__version__} | torch {torch.__version__}, transformers {transformers.__version__} | "
          f"{os.cpu_count()} CPUs ({cpu_name()}), torch threads {args.threads or torch.get_num_threads()}")
    print(f"toy base {Path(spec.base).name}: "
          f"{json.loads((Path(spec.base) / 'ibridge_base.json').read_text())['parameters']:,} parameters; "
          f"{spec.n_sft} demonstrations, {spec.n_dpo} preference pairs, max_length {spec.max_length}")
    print(f"settings (all tools): fp32 (no autocast), eager attention, gradient checkpointing off, "
          f"batch {spec.sft['batch_size']} (SFT) / {spec.dpo['batch_size']} pairs (DPO), "
          f"SFT {spec.sft['steps']} steps lr {spec.sft['lr']:g}, DPO {spec.dpo['steps']} steps lr {spec.dpo['lr']:g} "
          f"beta {spec.dpo['beta']:g}, {spec.schedule} schedule, warmup {spec.warmup_ratio:g}, "
          f"max_grad_norm {spec.sft['max_grad_norm']:g}, no eval, no checkpoints")
    print(f"each configuration in its own process, {args.repeats} interleaved repeats; targets from the best run "
          f"of each, medians beside", flush=True)


def _speed_section(stats: dict, skip: set[str]) -> bool:
    """The DPO and SFT tables against TRL and the bare loop, and their targets."""
    targets = Targets("best")
    if "dpo" not in skip:
        print_table("DPO (whole stage includes tokenisation and the reference pass)", DPO_CONFIGS, stats)
        print_breakdown(DPO_CONFIGS, stats)
        ours = stats["ibridge_dpo"]
        targets.throughput("ibridge DPO / TRL, reference on the fly (whole stage)", ours, stats["trl_dpo"], "whole", 1.5)
        targets.throughput("ibridge DPO / TRL, precomputed reference (whole stage)", ours,
                           stats["trl_dpo_precompute"], "whole", 1.0)
        targets.throughput("ibridge DPO / packed bare loop (optimisation steps)", ours, stats["bare_dpo"], "steps", 0.9)
        targets.memory("ibridge DPO peak RSS / TRL on the fly", ours, stats["trl_dpo"], 1.0)
        targets.memory("ibridge DPO peak RSS / TRL precomputed", ours, stats["trl_dpo_precompute"], 1.0)
    if "sft" not in skip:
        print_table("SFT", SFT_CONFIGS, stats)
        print_breakdown(SFT_CONFIGS, stats)
        ours = stats["ibridge_sft"]
        targets.throughput("ibridge SFT / TRL SFT (whole stage)", ours, stats["trl_sft"], "whole", 1.2)
        targets.throughput("ibridge SFT / packed bare loop (optimisation steps)", ours, stats["bare_sft"], "steps", 0.9)
        targets.memory("ibridge SFT peak RSS / TRL SFT", ours, stats["trl_sft"], 1.0)
    targets.print("ratios of best runs; medians in brackets; 'within 10% of the bare loop' read as >= 0.90x")
    return targets.ok


def _defaults_section(script: Path, spec: Spec, work: Path, steps: int, stats: dict, raw: dict) -> None:
    """Each tool with its own defaults: a user-facing fact, not part of the speed comparison."""
    dspec = Spec(spec, sft=dict(spec.sft, steps=steps), dpo=dict(spec.dpo, steps=steps))
    dfile = work / "spec_defaults.json"
    dfile.write_text(json.dumps(dspec))
    print(f"\nEach tool with its own defaults on this machine (a user-facing fact, not the speed comparison; "
          f"TRL: {steps} steps, one run each)")
    print("  TRL on a CPU-only machine refuses to start with its defaults (bf16=True: \"Your setup doesn't "
          "support bf16/gpu\") until use_cpu=True is given; with use_cpu=True and everything else its default "
          "(model loaded by TRL from the path):")
    for name, kind in (("trl_sft_defaults", "sft"), ("trl_dpo_defaults", "dpo")):
        raw[name] = run = spawn(script, name, dfile)
        s = run["settings"]
        print(f"    TRL {kind.upper()}: bf16 autocast {s['bf16']}, gradient checkpointing "
              f"{s['gradient_checkpointing']}, attention {s['attn_implementation']}, lr {s['learning_rate']:g}, "
              f"{s['optim']}: {fmt_rate(rates(run)[1]).strip()} tok/s over the steps "
              f"({run['steps_s'] / max(run['steps'], 1):.2f} s/step)")
    ours = [f"{kind.upper()} {fmt_rate(stats[f'ibridge_{kind}']['steps_best']).strip()} tok/s"
            for kind in ("sft", "dpo") if f"ibridge_{kind}" in stats]
    print("  ibridge's defaults on this machine are the configuration measured above (trainer=auto: fp32, "
          "eager attention on CPU, no checkpointing, padding-free packing)" + (": " + ", ".join(ours) if ours
                                                                                 else ""))


def _objectives_section(args, env: dict, raw: dict) -> bool:
    """The f-divergence objectives' step throughput against sft (benchmarks/bench_objectives.py)."""
    print(f"\nf-divergence objectives: step throughput vs sft (warm reference cache; "
          f"benchmarks/bench_objectives.py --steps {args.objective_steps} --repeats 5, same threads)", flush=True)
    ok = True
    for granularity in ("sequence", "token"):
        cmd = [sys.executable, str(HERE / "bench_objectives.py"), "--steps", str(args.objective_steps),
               "--repeats", "5", "--granularity", granularity, *args.overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        table = proc.stdout.strip().splitlines()
        print("\n".join("  " + line for line in table[-8:]) if proc.returncode == 0 else
              f"  bench_objectives failed:\n{proc.stderr[-2000:]}")
        raw[f"objectives_{granularity}"] = table
        ok &= proc.returncode == 0 and "< 0.9 target" not in proc.stdout
    return ok


def _generation_section(script: Path, spec: Spec, spec_file: Path, args, env: dict, raw: dict) -> bool:
    """Generation against a plain model.generate, and the eval job as a user runs it (target < 60 s)."""
    raw["generation"] = gen = spawn(script, "generation", spec_file)
    plain_s, ours_s = min(gen["times"]["plain"]), min(gen["times"]["ibridge"])
    print(f"\nGeneration in the eval job ({gen['prompts']} eval prompts, greedy, max_new_tokens "
          f"{gen['max_new_tokens']}, batch {gen['batch_size']}, base model; best of {len(gen['times']['plain'])})")
    print(f"  plain model.generate (prompts in order): {gen['tokens']['plain'] / plain_s / 1000:6.2f}k tok/s "
          f"({gen['tokens']['plain']} tokens, {plain_s:.2f} s)")
    print(f"  ibridge.evaluation.generate:             {gen['tokens']['ibridge'] / ours_s / 1000:6.2f}k tok/s "
          f"({gen['tokens']['ibridge']} tokens, {ours_s:.2f} s)  ratio {plain_s / ours_s:.2f}x")
    # The eval job as a user runs it: a fresh process, base model against itself as reference (so the
    # sampled KL and implicit-reward accuracy run too), no logger.
    out_dir = Path(tempfile.mkdtemp(prefix="bench-evaljob-"))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ibridge", "eval", "logger=none", f"reference={spec.base}",
                           f"output_dir={out_dir}", "resume=false", *args.overrides],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    raw["eval_job_s"] = job_s = time.perf_counter() - start
    ok = gen["eval_s"] < 60 and job_s < 60 and proc.returncode == 0
    print(f"  eval of the default world (generate, judge, sampled KL, implicit-reward accuracy): "
          f"evaluate_checkpoint {gen['eval_s']:.1f} s; `ibridge eval reference=<base>` as a fresh process "
          f"{job_s:.1f} s wall{'' if proc.returncode == 0 else ' (FAILED: ' + proc.stderr[-300:] + ')'} "
          f"(target < 60 s) {'ok' if ok else 'MISSED'}")
    return ok


def main() -> None:
    args = _parser().parse_args()
    if args.worker:
        return worker_main(args, WORKERS)

    trl = require_trl("bench_trl.py")
    script = Path(__file__).resolve()
    skip = set(filter(None, args.skip.split(",")))
    wall = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-trl-"))
    spec = toy_spec(args, work)
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps(spec))
    _print_setting(trl, spec, args)

    configs = ([] if "dpo" in skip else DPO_CONFIGS) + ([] if "sft" in skip else SFT_CONFIGS)
    runs = run_interleaved(script, configs, spec_file, args.repeats, wall)
    stats = {name: summarise(r) for name, r in runs.items() if r}
    raw: dict = {"spec": spec, "runs": runs}
    all_ok = _speed_section(stats, skip)
    if "check" not in skip:
        raw["check"] = check = spawn(script, "check", spec_file)
        all_ok &= print_check(check, 1e-5)
    if "defaults" not in skip and args.default_steps > 0:
        _defaults_section(script, spec, work, args.default_steps, stats, raw)
    pinned = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    quiet = dict(os.environ, **pinned, TQDM_DISABLE="1", WANDB_MODE="disabled")
    if "objectives" not in skip:
        all_ok &= _objectives_section(args, quiet, raw)
    if "generation" not in skip:
        all_ok &= _generation_section(script, spec, spec_file, args, quiet, raw)

    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))
    print(f"\n{'all targets met' if all_ok else 'some targets MISSED'}; benchmark wall time "
          f"{time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
