"""The `cell` wandb run: one per pipeline, the run a dashboard's cell panels read (docs/design.md §3).

Logged last. Its config holds the swept axes at the top level (``objective``, ``lr``,
``seed``, ``base_seed``, ``dpo.*``; see :func:`ibridge.naming.cell_axes`); its summary:

- ``eval/{base,sft,dpo}/{win_rate, win_rate_ci_low, win_rate_ci_high, lc_win_rate,
  gold_reward, kl_to_ref, implicit_reward_acc, avg_length}`` and, judged with ``judge=alpaca_eval``,
  ``{win_rate_se, lc_win_rate_se, gold_win_rate, n_judged, judge_tokens, judge_cost_usd}`` and the
  labels ``{judge, judge_model, lc_method}`` (what results.json's
  ``eval_by_stage`` holds; base has no KL or implicit-reward accuracy: it has no reference),
- ``train/{sft,dpo}/{steps, runtime_s, tokens, kl_token}`` (results.json's ``stages``),
- ``dpo_minus_sft/<metric>``: ``eval/dpo/<metric> - eval/sft/<metric>``,
- ``status`` (``completed`` or ``failed``) and, when failed, ``error``.

Its history is the two training stages' curves from metrics.jsonl, each key under its
stage (``sft/train/loss``, ``dpo/rewards/margins``), so that curves grouped by
objective and lr come from the same runs as the win rates.
"""

from __future__ import annotations

import math

from ibridge.judging.names import JUDGED_KEYS, judge_labels

EVAL_KEYS = ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "lc_win_rate", "gold_reward", "kl_to_ref",
             "implicit_reward_acc", "avg_length", *JUDGED_KEYS)  # judge=alpaca_eval: se, n, tokens, cost, gold
TRAIN_KEYS = ("steps", "runtime_s", "tokens", "kl_token")
DELTA_KEYS = ("win_rate", "lc_win_rate", "gold_reward", "implicit_reward_acc", "avg_length")
STAGES = ("sft", "dpo")


def _number(value) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def stage_eval(metrics: dict) -> dict:
    """One stage's evaluation metrics with the CI split into two numbers."""
    flat = dict(metrics)
    ci = flat.pop("win_rate_ci", None)
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        flat["win_rate_ci_low"], flat["win_rate_ci_high"] = ci
    return {key: flat[key] for key in EVAL_KEYS if _number(flat.get(key)) is not None}


def cell_summary(results: dict, status: str, error: str | None = None) -> dict:
    """The cell run's summary from a pipeline's results (see the module docstring)."""
    summary: dict = {"status": status}
    if error:
        summary["error"] = error
    evals = {stage: stage_eval(metrics or {}) for stage, metrics in (results.get("eval_by_stage") or {}).items()}
    for stage, metrics in evals.items():
        summary.update({f"eval/{stage}/{key}": value for key, value in metrics.items()})
    for stage, record in (results.get("stages") or {}).items():
        summary.update({f"train/{stage}/{key}": record[key] for key in TRAIN_KEYS
                        if _number(record.get(key)) is not None})
    summary.update(judge_labels(results.get("eval_by_stage") or {}))  # the judge's name, model, LC method
    sft, dpo = evals.get("sft", {}), evals.get("dpo", {})
    for key in DELTA_KEYS:
        if key in sft and key in dpo:
            summary[f"dpo_minus_sft/{key}"] = dpo[key] - sft[key]
    return summary


def stage_history(records: list[dict]) -> list[tuple[int, dict]]:
    """metrics.jsonl's training records as ``(step, {"<stage>/<key>": value})``, by step."""
    rows: dict[int, dict] = {}
    for record in records:
        stage, step = record.get("stage"), record.get("step")
        if stage not in STAGES or not isinstance(step, int):
            continue
        row = rows.setdefault(step, {})
        for key, value in record.items():
            if key not in ("stage", "step") and _number(value) is not None:
                row[f"{stage}/{key}"] = value
    return sorted(rows.items())


def log_cell(ctx, status: str, error: str | None = None) -> None:
    """Log the cell run (wandb only; rank 0). Kept in the run folder's run_log.json, so a
    pipeline run again in its folder replaces its cell run rather than adding one."""
    from ibridge.naming import cell_axes
    from ibridge.tracking import read_metrics

    logger = ctx.logger
    if logger.backend != "wandb" or not logger.enabled:
        return
    logger.start("cell", ctx.run_name("cell"), home=ctx.run_dir, job_type="cell", config=cell_axes(ctx.cfg))
    for step, row in stage_history(read_metrics(logger.metrics_path)):
        logger.log_wandb(row, step=step)
    logger.summary(cell_summary(ctx.results, status, error))
    if status == "completed":
        logger.finish()
    else:
        logger.fail(error or status)
