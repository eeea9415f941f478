"""`ibridge eval`: evaluate any checkpoint (default: the base model)."""

from __future__ import annotations

from ibridge.evaluation.evaluate import evaluate_checkpoint


def evaluate_stage(ctx, label: str, policy, reference) -> dict:
    """Evaluate `policy` as its own wandb run (job_type eval) under ``eval/<label>``."""
    ctx.logger.start("eval", f"eval-{label}-s{ctx.cfg.seed}", {"evaluated": label})
    metrics = evaluate_checkpoint(
        ctx.cfg, ctx.source, policy, reference, ctx.runtime, ctx.run_dir / "eval" / label, generator=label
    )
    scalars = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    ctx.logger.log(scalars, step=0)
    ctx.logger.summary(scalars)
    ctx.logger.finish()
    return metrics


def run(ctx) -> None:
    cfg = ctx.cfg
    policy = ctx.checkpoint_or_base(cfg.checkpoint)
    reference = ctx.checkpoint_or_base(cfg.reference) if cfg.reference else None
    metrics = evaluate_stage(ctx, "checkpoint", policy, reference)
    ctx.results["eval"] = metrics
