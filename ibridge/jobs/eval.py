"""`ibridge eval`: evaluate any checkpoint (default: the base model)."""

from __future__ import annotations

import json

from ibridge.distributed import all_reduce_sum
from ibridge.evaluation.evaluate import evaluate_checkpoint
from ibridge.io import write_json_atomic
from ibridge.stage_inputs import EVAL_KINDS, StageGuard, check_only_stop, judge_model

# Columns of the `eval/generations` table, as generations.jsonl names them.
TABLE_COLUMNS = ("prompt", "output", "reference", "reward", "reference_reward", "preference", "first_error")
DEFAULT_TABLE_ROWS = 100


def eval_scalars(label: str, metrics: dict) -> dict:
    """``eval/<label>/<metric>`` for every number, the CI as ``win_rate_ci_low``/``_high``:
    base, sft and dpo evaluations keep apart in a dashboard that reads several runs."""
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if isinstance(metrics.get("win_rate_ci"), (list, tuple)) and len(metrics["win_rate_ci"]) == 2:
        flat["win_rate_ci_low"], flat["win_rate_ci_high"] = metrics["win_rate_ci"]
    return {f"eval/{label}/{k}": v for k, v in flat.items()}


def generations_table(path, max_rows: int) -> tuple[list[str], list[list]]:
    """The first `max_rows` rows of generations.jsonl as table columns and rows."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if len(rows) >= max_rows:
                break
            record = json.loads(line)
            row = []
            for column in TABLE_COLUMNS:
                value = record.get(column)
                row.append(value if value is None or isinstance(value, (str, int, float)) else json.dumps(value))
            rows.append(row)
    return list(TABLE_COLUMNS), rows


def evaluate_stage(ctx, label: str, policy, reference) -> dict:
    """Evaluate `policy` as its own wandb run (job_type eval) under ``eval/<label>``.

    ``eval/<label>/eval.json`` is written last: when it exists (a resumed run) the
    evaluation is not repeated. The run logs ``eval/<label>/<metric>`` and an
    ``eval/generations`` table (the first ``logger.table_rows`` generations).

    Under torchrun every rank evaluates its share (``evaluate_checkpoint``); rank 0 writes
    the files and logs, and returns the metrics (the other ranks return ``{}``).
    """
    info = ctx.runtime.dist
    out_dir = ctx.run_dir / "eval" / label
    marker = out_dir / "eval.json"
    # Every rank takes rank 0's decision (one collective): a rank that skipped the
    # evaluation while the others ran it would pair their collectives off (a resumed
    # torchrun job deadlocked so).
    done_before = all_reduce_sum([float(info.is_main and marker.is_file())], info)[0] > 0
    inputs = StageGuard(ctx, out_dir, f"the {label} evaluation", EVAL_KINDS if reference else EVAL_KINDS[:1],
                        {"policy": policy, "reference": reference, "judge": judge_model(ctx.cfg)})
    if done_before:
        inputs.refuse_if_changed(finished=True)  # a stale result is never skipped to
        return json.loads(marker.read_text()) if info.is_main else {}
    check_only_stop(ctx, f"the {label} evaluation")
    if info.is_main:
        ctx.logger.start("eval", ctx.run_name(f"eval-{label}"), {"evaluated": label}, home=out_dir)
    # AlpacaEval's `generator` names the run (`dpo-jsd-lr1e-4-s0`), so outputs of several runs stay apart.
    metrics = evaluate_checkpoint(ctx.cfg, ctx.source, policy, reference, ctx.runtime, out_dir, generator=label,
                                  model_name=ctx.run_name(label))
    if not info.is_main:
        return {}
    scalars = eval_scalars(label, metrics)
    ctx.logger.log(scalars, step=0)
    ctx.logger.summary(scalars)
    max_rows = int(ctx.cfg.logger.get("table_rows", DEFAULT_TABLE_ROWS))
    if max_rows > 0 and (out_dir / "generations.jsonl").is_file():
        ctx.logger.log_table("eval/generations", *generations_table(out_dir / "generations.jsonl", max_rows), step=0)
    ctx.logger.finish()
    inputs.record()
    write_json_atomic(marker, metrics)
    return metrics


def run(ctx) -> None:
    cfg = ctx.cfg
    policy = ctx.checkpoint_or_base(cfg.checkpoint)
    reference = ctx.checkpoint_or_base(cfg.reference) if cfg.reference else None
    metrics = evaluate_stage(ctx, "checkpoint", policy, reference)
    ctx.results["eval"] = metrics
