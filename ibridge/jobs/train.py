"""`ibridge train`: one stage; the objective decides which data it needs and which keys set it
(``lr``/``sft.*`` or ``dpo.lr``/``dpo.*``: ibridge/stage_settings.py)."""

from __future__ import annotations

from ibridge.stage_settings import stage_lr, trained_stage
from ibridge.stages import train_stage


def run(ctx) -> None:
    cfg = ctx.cfg
    init = ctx.checkpoint_or_base(cfg.checkpoint)
    reference = ctx.checkpoint_or_base(cfg.reference) if cfg.reference else init
    stage = trained_stage(cfg)
    record = train_stage(
        ctx,
        stage=stage,
        objective_cfg=cfg.objective,
        lr=stage_lr(cfg, stage),  # lr for demonstration stages, dpo.lr for preference stages
        opt_cfg=cfg[stage],
        init_path=init,
        reference_path=reference,
        out_dir=ctx.run_dir / stage,
        run_name=ctx.run_name(stage),
    )
    ctx.results["stages"] = {stage: record}
