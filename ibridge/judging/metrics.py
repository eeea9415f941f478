"""The judged evaluation's numbers (docs/design.md §3): win rate, standard error, n, length control, tokens, cost.

``win_rate`` is the mean over prompts of P(the model's output is better), as AlpacaEval 2's
weighted judge defines it (identical outputs count 0.5); ``win_rate_se`` its standard error
over prompts (``std(ddof=1) / sqrt(n)``, as alpaca_eval reports); ``win_rate_ci`` a bootstrap
95% interval like every other judge's. ``lc_win_rate`` is AlpacaEval 2's length-controlled
win rate, from alpaca_eval's own GLM (``length_controlled_v1``), only when the prompts are
AlpacaEval's 805 in their order (``eval_set=alpaca_eval``); otherwise ibridge's one-model
logistic fit (`ibridge.evaluation.stats.length_controlled_win_rate`), which is not
comparable with AlpacaEval 2 numbers. ``lc_method`` says which.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from ibridge.evaluation import stats
from ibridge.judging.names import LC_GLM, LC_ONE_MODEL

if TYPE_CHECKING:
    from ibridge.judging.runner import Judgment

log = logging.getLogger(__name__)

ALPACA_EVAL_PROMPTS = 805


def judged_metrics(judgments: list[Judgment], outputs: list[str], references: list[str], *, price: float | None,
                   judge: str, model: str, bootstrap_resamples: int, seed: int,
                   alpaca_indices: list[int] | None = None) -> dict:
    """Metrics of one evaluation's judgments (see the module docstring); `price` in USD per token."""
    kept = [i for i, j in enumerate(judgments) if j.preference is not None]
    prefs = np.array([judgments[i].preference for i in kept], dtype=float)
    lengths = np.array([len(outputs[i].split()) for i in kept])
    ref_lengths = np.array([len(references[i].split()) for i in kept])
    asked = [j for j in judgments if j.source != "tie"]
    tokens = sum(j.prompt_tokens + j.completion_tokens for j in asked)
    new = [j for j in asked if j.source == "request"]
    metrics: dict = {
        "judge": judge, "judge_model": model,
        "judge_served_model": ",".join(sorted({j.served_model for j in asked if j.served_model})) or None,
        "n_judged": len(kept), "n_ties": sum(j.source == "tie" for j in judgments),
        "n_unparsed": len(judgments) - len(kept),
        "judge_model_first": float(np.mean([j.model_first for j in asked])) if asked else None,
        "judge_prompt_tokens": sum(j.prompt_tokens for j in asked),
        "judge_completion_tokens": sum(j.completion_tokens for j in asked),
        "judge_tokens": tokens,
        "judge_cost_usd": None if price is None else tokens * price,
        "judge_requests": len(new), "judge_cached": len(asked) - len(new),
        "judge_new_tokens": sum(j.prompt_tokens + j.completion_tokens for j in new),
    }
    if not len(prefs):
        log.warning("judge: no judgment could be parsed; no win rate")
        return metrics
    low, high = stats.bootstrap_ci(prefs, n_resamples=bootstrap_resamples, seed=seed)
    metrics.update(win_rate=stats.win_rate(prefs), win_rate_ci=[low, high],
                   win_rate_se=float(prefs.std(ddof=1) / np.sqrt(len(prefs))) if len(prefs) > 1 else None)
    glm = None
    if alpaca_indices is not None and len(kept) == ALPACA_EVAL_PROMPTS:
        glm = alpaca_glm(prefs, [outputs[i] for i in kept], [references[i] for i in kept],
                         [alpaca_indices[i] for i in kept], judge)
    if glm is not None:
        metrics.update(lc_win_rate=glm[0], lc_win_rate_se=glm[1], lc_method=LC_GLM)
    else:
        metrics.update(lc_win_rate=stats.length_controlled_win_rate(prefs, lengths, ref_lengths),
                       lc_method=LC_ONE_MODEL)
    return metrics


def alpaca_glm(prefs: np.ndarray, outputs: list[str], references: list[str], indices: list[int],
               annotator: str) -> tuple[float, float] | None:
    """AlpacaEval 2's LC win rate and its standard error in [0, 1], from
    ``alpaca_eval.metrics.get_length_controlled_winrate`` on its own annotation format
    (output_1 the reference, output_2 the model, preference 1 + P(model better), rows
    indexed by the AlpacaEval instruction). None, with a warning, when its data
    (``df_gamed.csv`` of the tatsu-lab/alpaca_eval hub dataset) cannot be had."""
    import pandas as pd

    from ibridge.judging.annotator import import_alpaca_eval

    import_alpaca_eval()  # restores the root logger's level that importing alpaca_eval changes
    from alpaca_eval.metrics.glm_winrate import get_length_controlled_winrate

    frame = pd.DataFrame({"output_1": references, "output_2": outputs, "preference": 1.0 + prefs,
                          "generator_1": "reference", "generator_2": "model", "annotator": annotator},
                         index=pd.Index(indices))
    try:
        result = get_length_controlled_winrate(frame, save_weights_dir=None, is_add_glm_preference_inplace=False)
    except Exception as err:  # the hub file is missing offline, or an alpaca_eval version differs
        log.warning("judge: AlpacaEval's length-controlled GLM unavailable (%s: %s); lc_win_rate is ibridge's "
                    "one-model fit instead", type(err).__name__, " ".join(str(err).split())[:200])
        return None
    return float(result["length_controlled_winrate"]) / 100, float(result["lc_standard_error"]) / 100
