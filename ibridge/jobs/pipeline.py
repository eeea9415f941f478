"""`ibridge pipeline` (the default job): base → SFT(objective, lr) → DPO(dpo.*) → eval.

The paper's unit of experiment (DESIGN.md §3). Each stage is evaluated, so a
run shows what SFT and DPO each added: ``eval_by_stage`` holds base, sft and
dpo; ``eval`` is the final (post-DPO) model's.
"""

from __future__ import annotations

from pathlib import Path

from ibridge.jobs.eval import evaluate_stage
from ibridge.stages import train_stage


def run(ctx) -> None:
    cfg = ctx.cfg
    base = ctx.base_model
    by_stage = {"base": evaluate_stage(ctx, "base", base, None)}
    ctx.results["eval_by_stage"] = by_stage

    sft = train_stage(
        ctx, stage="sft", objective_cfg=cfg.objective, lr=cfg.lr, opt_cfg=cfg.sft, init_path=base,
        out_dir=ctx.run_dir / "sft", run_name=ctx.run_name("sft", cfg.objective.name, cfg.lr),
    )
    ctx.results["stages"] = {"sft": sft}
    by_stage["sft"] = evaluate_stage(ctx, "sft", Path(sft["checkpoint"]), base)

    dpo = train_stage(
        ctx, stage="dpo", objective_cfg=cfg.dpo.objective, lr=cfg.dpo.lr, opt_cfg=cfg.dpo,
        init_path=Path(sft["checkpoint"]), out_dir=ctx.run_dir / "dpo",
        run_name=ctx.run_name("dpo", cfg.objective.name, cfg.lr),
    )
    ctx.results["stages"]["dpo"] = dpo
    by_stage["dpo"] = evaluate_stage(ctx, "dpo", Path(dpo["checkpoint"]), Path(sft["checkpoint"]))
    ctx.results["eval"] = by_stage["dpo"]
