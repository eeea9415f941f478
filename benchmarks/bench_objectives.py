"""Step throughput of every demonstration objective relative to `sft` (issue: objectives, part 2).

    python benchmarks/bench_objectives.py [--steps 60] [--repeats 3]

Same toy base model, same demonstrations, same batches (same seed), fp32 on this
machine's CPU, reference log-probs already cached (a warm cache: the reference
pass is done once before timing, as a later run with the same reference and data
finds it on disk). Each objective is timed `--repeats` times, interleaved, and the
best run counts, to damp noise from other processes. Prints steps/s and the ratio
to sft; the target is >= 0.9x for every objective.

Beside each ratio: the objective's own arithmetic (its loss, metrics and backward on a
batch's log-probs, no model) in ms per micro-batch, timed over many calls, and the ratio
that cost alone predicts. A measured ratio well below the predicted one is noise from
other processes, not cost (an 0.88x jsd figure in one run was: its arithmetic costs
0.3 ms more than sft's in a 21 ms step, BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch
from hydra import compose, initialize_config_dir

from ibridge.cli import CONF_DIR
from ibridge.data import source_for
from ibridge.data.collate import collate_demonstrations
from ibridge.data.formatting import encode_split
from ibridge.models import ensure_toy_base, load_model, load_tokenizer
from ibridge.objectives import build_objective
from ibridge.runtime import resolve_runtime
from ibridge.stages import attach_reference, demonstration_step
from ibridge.training import OptimSettings, optimise

OBJECTIVES = ["sft", "tv", "chi2", "hellinger", "jsd", "rkl"]


def objective_ms(params: dict, batch: dict, calls: int = 200) -> float:
    """ms per call of the objective alone (forward and backward) on this batch's shapes, best of 3."""
    mask = batch["labels"][:, 1:] != -100
    ref = batch["ref_logps"] if "ref_logps" in batch else torch.zeros(mask.shape)
    objective = build_objective(params)
    best = float("inf")
    for _ in range(3):
        logps = (ref + 0.01).requires_grad_()
        start = time.perf_counter()
        for _ in range(calls):
            objective(logps, ref, mask).loss.backward()
        best = min(best, (time.perf_counter() - start) / calls * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--granularity", default="sequence", choices=["sequence", "token"])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. debug=smoke")
    args = parser.parse_args()

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=args.overrides)
    runtime = resolve_runtime(cfg.trainer)
    source = source_for(cfg.data)
    base = ensure_toy_base(cfg.model, source.world_config, runtime)
    tokenizer = load_tokenizer(base)
    encoded, _ = encode_split(tokenizer, source.examples("demonstrations"), "demonstrations", cfg.model.max_length)
    ctx = SimpleNamespace(cfg=cfg, runtime=runtime)
    attach_reference(encoded, "demonstrations", base, ctx, tokenizer.pad_token_id)  # warms the cache
    settings = OptimSettings(lr=1e-4, max_steps=args.steps, batch_size=int(cfg.sft.batch_size),
                             log_every=10**9, seed=0)
    pad = tokenizer.pad_token_id
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name in OBJECTIVES:
            params = {"name": name} if name == "sft" else {"name": name, "granularity": args.granularity}
            objective = build_objective(params)
            model = load_model(base, runtime)
            start = time.perf_counter()
            optimise(model, encoded, lambda items: collate_demonstrations(items, pad),
                     demonstration_step(objective), settings, runtime, desc=name)
            rate = args.steps / (time.perf_counter() - start)
            best[name] = max(best.get(name, 0.0), rate)
    print(f"\ntorch {torch.__version__}, threads {torch.get_num_threads()}, device {runtime.device}, "
          f"precision {runtime.precision}, batch {settings.batch_size}, {args.steps} steps x {args.repeats} "
          f"repeats (best), granularity {args.granularity}, warm reference cache")
    batch = collate_demonstrations(encoded[: settings.batch_size], pad)
    own = {name: objective_ms({"name": name} if name == "sft" else {"name": name, "granularity": args.granularity},
                              batch) for name in OBJECTIVES}
    step_ms = 1e3 / best["sft"]
    print(f"{'objective':<10} {'steps/s':>9} {'vs sft':>7}   {'own ms':>6}  {'cost alone predicts':>19}")
    for name in OBJECTIVES:
        ratio = best[name] / best["sft"]
        predicted = step_ms / (step_ms + own[name] - own["sft"])
        flag = "" if ratio >= 0.9 else "  < 0.9 target"
        print(f"{name:<10} {best[name]:>9.1f} {ratio:>6.2f}x   {own[name]:>6.2f}  {predicted:>18.3f}x{flag}")


if __name__ == "__main__":
    main()
