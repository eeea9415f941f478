"""`ibridge eval`: evaluate any checkpoint (default: the base model)."""

from __future__ import annotations

import json

from ibridge.distributed import all_reduce_sum, barrier
from ibridge.evaluation.evaluate import evaluate_checkpoint
from ibridge.io import write_json_atomic


def evaluate_stage(ctx, label: str, policy, reference) -> dict:
    """Evaluate `policy` as its own wandb run (job_type eval) under ``eval/<label>``.

    ``eval/<label>/eval.json`` is written last: when it exists (a resumed run) the
    evaluation is not repeated.
    """
    out_dir = ctx.run_dir / "eval" / label
    marker = out_dir / "eval.json"
    # Every rank takes rank 0's decision (one collective): a rank that returned early here
    # while another waited in the barrier below would pair later collectives off by one
    # (a resumed torchrun job deadlocked so).
    done_before = all_reduce_sum([float(ctx.runtime.dist.is_main and marker.is_file())], ctx.runtime.dist)[0] > 0
    if done_before:
        return json.loads(marker.read_text()) if ctx.runtime.dist.is_main else {}
    if not ctx.runtime.dist.is_main:  # rank 0 evaluates; the others wait for it
        barrier(ctx.runtime.dist)
        return {}
    ctx.logger.start("eval", f"eval-{label}-s{ctx.cfg.seed}", {"evaluated": label})
    metrics = evaluate_checkpoint(ctx.cfg, ctx.source, policy, reference, ctx.runtime, out_dir, generator=label)
    scalars = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    ctx.logger.log(scalars, step=0)
    ctx.logger.summary(scalars)
    ctx.logger.finish()
    write_json_atomic(marker, metrics)
    barrier(ctx.runtime.dist)
    return metrics


def run(ctx) -> None:
    cfg = ctx.cfg
    policy = ctx.checkpoint_or_base(cfg.checkpoint)
    reference = ctx.checkpoint_or_base(cfg.reference) if cfg.reference else None
    metrics = evaluate_stage(ctx, "checkpoint", policy, reference)
    ctx.results["eval"] = metrics
