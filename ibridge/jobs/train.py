"""`ibridge train`: one stage; the objective decides which data it needs."""

from __future__ import annotations

from ibridge.objectives import data_kind_of
from ibridge.stages import train_stage


def run(ctx) -> None:
    cfg = ctx.cfg
    init = ctx.checkpoint_or_base(cfg.checkpoint)
    reference = ctx.checkpoint_or_base(cfg.reference) if cfg.reference else init
    stage = "sft" if data_kind_of(cfg.objective.name) == "demonstrations" else "dpo"
    record = train_stage(
        ctx,
        stage=stage,
        objective_cfg=cfg.objective,
        lr=cfg.lr,
        opt_cfg=cfg[stage],
        init_path=init,
        reference_path=reference,
        out_dir=ctx.run_dir / stage,
        run_name=ctx.run_name(stage),
    )
    ctx.results["stages"] = {stage: record}
