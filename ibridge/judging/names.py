"""Names shared by the judging modules and the tables that show their results (no imports)."""

NAME = "alpaca_eval"  # the judge option, conf/judge/alpaca_eval.yaml
LC_GLM = "alpaca_eval GLM length_controlled_v1 (AlpacaEval 2's LC win rate, 805 prompts)"
LC_ONE_MODEL = "ibridge one-model logistic fit (not AlpacaEval 2's LC win rate)"

# The judged numbers a `cell` run's summary carries per stage (ibridge/cell.py), beside its EVAL_KEYS.
JUDGED_KEYS = ("win_rate_se", "lc_win_rate_se", "gold_win_rate", "gold_lc_win_rate", "n_judged", "judge_tokens",
               "judge_cost_usd")
# ... and the judge's labels, as text.
JUDGE_LABELS = ("judge", "judge_model", "lc_method")


def judge_labels(evals: dict[str, dict]) -> dict[str, str]:
    """``eval/<stage>/<label>`` for each judged stage's text labels (judge, model, LC method)."""
    return {f"eval/{stage}/{key}": str(metrics[key]) for stage, metrics in evals.items()
            if "judge_tokens" in (metrics or {}) for key in JUDGE_LABELS if metrics.get(key) is not None}
