"""`ibridge pipeline` (the default job): base → SFT(objective, lr) → DPO(dpo.*) → eval.

The paper's unit of experiment (docs/design.md §3). Each stage is evaluated, so a
run shows what SFT and DPO each added: ``eval_by_stage`` holds base, sft and
dpo; ``eval`` is the final (post-DPO) model's. Last comes the `cell` wandb run,
which sums the pipeline up for dashboards (:mod:`ibridge.cell`), also when a
stage failed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ibridge.cell import log_cell
from ibridge.jobs.eval import evaluate_stage
from ibridge.stage_inputs import StaleRunError
from ibridge.stages import train_stage

log = logging.getLogger(__name__)


def run(ctx) -> None:
    if ctx.check_only:  # every stage checks its inputs; the cell run was logged when it completed
        _stages(ctx)
        return
    try:
        _stages(ctx)
    except StaleRunError:
        raise  # nothing ran: the earlier cell run stays as it is
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
        ctx.logger.fail(error)  # the stage's own run first
        try:
            log_cell(ctx, "failed", error)
        except Exception as cell_err:  # the stage's error is the one to report
            log.warning("could not log the cell run: %s", cell_err)
        raise
    log_cell(ctx, "completed")


def _stages(ctx) -> None:
    cfg = ctx.cfg
    base = ctx.base_model
    by_stage = {"base": evaluate_stage(ctx, "base", base, None)}
    ctx.results["eval_by_stage"] = by_stage

    sft = train_stage(
        ctx, stage="sft", objective_cfg=cfg.objective, lr=cfg.lr, opt_cfg=cfg.sft, init_path=base,
        out_dir=ctx.run_dir / "sft", run_name=ctx.run_name("sft"),
    )
    ctx.results["stages"] = {"sft": sft}
    by_stage["sft"] = evaluate_stage(ctx, "sft", Path(sft["checkpoint"]), base)

    dpo = train_stage(
        ctx, stage="dpo", objective_cfg=cfg.dpo.objective, lr=cfg.dpo.lr, opt_cfg=cfg.dpo,
        init_path=Path(sft["checkpoint"]), out_dir=ctx.run_dir / "dpo", run_name=ctx.run_name("dpo"),
    )
    ctx.results["stages"]["dpo"] = dpo
    by_stage["dpo"] = evaluate_stage(ctx, "dpo", Path(dpo["checkpoint"]), Path(sft["checkpoint"]))
    ctx.results["eval"] = by_stage["dpo"]
