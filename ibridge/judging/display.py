"""How judged evaluations show at the end of a run (`ibridge.summary`), beside the gold numbers.

For runs judged with ``judge=alpaca_eval`` only: below the run's table, one row per
evaluated stage with the gold judge's reward and win rate (toy world) beside the judged
win rate ± its standard error, n, the LC win rate (``*``: AlpacaEval 2's GLM on its 805
prompts; otherwise ibridge's one-model fit), and the judge's tokens and cost; then the
judge, its model, and how many judgments were new requests or came from the cache
(docs/design.md §3).
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ibridge.judging.names import LC_GLM

STAGE_ORDER = ("base", "checkpoint", "sft", "dpo")


def _num(value, fmt: str = ".3f") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—"
    return format(value, fmt)


def _cost(ev: dict) -> str:
    cost = ev.get("judge_cost_usd")
    return "unknown" if not isinstance(cost, (int, float)) else f"${cost:.4f}"


def judged(evals: Iterable[dict]) -> bool:
    """Whether any of these evaluations was judged with judge=alpaca_eval."""
    return any("judge_tokens" in (ev or {}) for ev in evals)


def _stages(results: dict) -> dict[str, dict]:
    evals = dict(results.get("eval_by_stage") or {})
    if not evals and results.get("eval"):
        evals["checkpoint"] = results["eval"]
    order = [s for s in STAGE_ORDER if s in evals] + [s for s in evals if s not in STAGE_ORDER]
    return {stage: evals[stage] for stage in order if "judge_tokens" in (evals[stage] or {})}


def judged_table(results: dict) -> Table | None:
    """Gold and judged win rates side by side, one row per judged stage; None when none was judged."""
    stages = _stages(results)
    if not stages:
        return None
    table = Table(title="gold vs AlpacaEval judge", title_justify="left")
    for header in ("stage", "gold reward", "gold win rate", "judged win rate ± se", "n", "LC win rate",
                   "judge tokens", "cost"):
        table.add_column(header, justify="left" if header == "stage" else "right", no_wrap=True)
    for stage, ev in stages.items():
        judged_rate = _num(ev.get("win_rate"))
        if judged_rate != "—" and ev.get("win_rate_se") is not None:
            judged_rate += f" ± {_num(ev['win_rate_se'])}"
        lc = _num(ev.get("lc_win_rate")) + ("*" if ev.get("lc_method") == LC_GLM else "")
        table.add_row(stage, _num(ev.get("gold_reward")), _num(ev.get("gold_win_rate")), judged_rate,
                      str(ev.get("n_judged", "—")), lc, _num(ev.get("judge_tokens"), ","), _cost(ev))
    return table


def judge_notes(results: dict) -> list[str]:
    """The judge and its model, the LC method, and per stage the new requests and cache hits."""
    stages = _stages(results)
    if not stages:
        return []
    first = next(iter(stages.values()))
    lines = [f"judge: {first.get('judge')} ({first.get('judge_model')}); LC win rate: {first.get('lc_method')}"]
    lines += [f"  {stage}: {ev.get('judge_requests')} new requests, {ev.get('judge_cached')} from the cache, "
              f"{ev.get('n_ties')} identical to the reference (0.5, not sent)" for stage, ev in stages.items()]
    return lines


def print_judged(results: dict, console: Console) -> None:
    table = judged_table(results)
    if table is None:
        return
    console.print(table)
    for line in judge_notes(results):
        console.print(escape(line))
