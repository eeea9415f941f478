"""How judged evaluations show in the terminal table of a run (`ibridge.summary`), beside the gold numbers.

Columns only for runs judged with ``judge=alpaca_eval``: the judged win rate ± its standard
error in place of the win rate, then the gold judge's win rate (toy world) and the LC win
rate (``*``: AlpacaEval 2's GLM; otherwise ibridge's one-model fit); then one line per judged
stage with the judge, its model, n, tokens, cost, requests and cache hits (docs/design.md §3).
"""

from __future__ import annotations

from collections.abc import Callable

from ibridge.judging.names import LC_GLM


def _num(value, fmt: str = ".3f") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—"
    return format(value, fmt)


def _lc(ev: dict) -> str:
    text = _num(ev.get("lc_win_rate"))
    return text + "*" if text != "—" and ev.get("lc_method") == LC_GLM else text


def _cost(ev: dict) -> str:
    cost = ev.get("judge_cost_usd")
    return "cost unknown" if not isinstance(cost, (int, float)) else f"${cost:.4f}"


def judged(evals: list[dict]) -> bool:
    return any("judge_tokens" in ev for ev in evals)


def _judged_win_rate(ev: dict) -> str:
    text = _num(ev.get("win_rate"))
    return text + f" ± {_num(ev.get('win_rate_se'))}" if text != "—" and "win_rate_se" in ev else text


def judge_columns(evals: list[dict]) -> list[tuple[str, Callable[[dict], str]]]:
    """(header, cell text of a stage's metrics): the judged win rate's column, then the columns
    beside it (the gold win rate when there is one, the LC win rate); none for unjudged runs."""
    if not judged(evals):
        return []
    columns: list[tuple[str, Callable[[dict], str]]] = [("judged win rate ± se", _judged_win_rate)]
    if any("gold_win_rate" in ev for ev in evals):
        columns.append(("gold win rate", lambda ev: _num(ev.get("gold_win_rate"))))
    return columns + [("LC win rate", _lc)]


def judge_notes(evals: dict[str, dict]) -> list[str]:
    """One line per judged stage: the judge, its model, requests, cache hits, ties."""
    lines = []
    for stage, ev in evals.items():
        if "judge_tokens" not in ev:
            continue
        lines.append(f"judge ({stage}): {ev.get('judge')} ({ev.get('judge_model')}), n={ev.get('n_judged')}, "
                     f"{_num(ev.get('judge_tokens'), ',')} tokens, {_cost(ev)}; {ev.get('judge_requests')} new "
                     f"requests, {ev.get('judge_cached')} cached, {ev.get('n_ties')} identical outputs; "
                     f"LC{'*' if ev.get('lc_method') == LC_GLM else ''}: {ev.get('lc_method')}")
    return lines
