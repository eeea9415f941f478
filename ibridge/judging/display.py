"""How judged evaluations show in the terminal table of a run (`ibridge.summary`), beside the gold numbers.

Columns only for runs judged with ``judge=alpaca_eval``: the gold judge's win rate (toy
world), the judged win rate's standard error, the LC win rate (``*``: AlpacaEval 2's GLM;
otherwise ibridge's one-model fit), and the judge's tokens and cost; then one line per
judge with its model, requests and cache hits (docs/design.md §3).
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
    return "—" if not isinstance(cost, (int, float)) else f"${cost:.2f}"


def judged(evals: list[dict]) -> bool:
    return any("judge_tokens" in ev for ev in evals)


def judge_columns(evals: list[dict]) -> list[tuple[str, Callable[[dict], str]]]:
    """(header, cell text of a stage's metrics) for each extra column; none for unjudged runs."""
    if not judged(evals):
        return []
    columns: list[tuple[str, Callable[[dict], str]]] = []
    if any("gold_win_rate" in ev for ev in evals):
        columns.append(("gold win rate", lambda ev: _num(ev.get("gold_win_rate"))))
    columns += [("judged ± se", lambda ev: _num(ev.get("win_rate_se"))),
                ("LC win rate", _lc),
                ("judge tokens", lambda ev: _num(ev.get("judge_tokens"), ",")),
                ("judge cost", _cost)]
    return columns


def judge_notes(evals: dict[str, dict]) -> list[str]:
    """One line per judged stage: the judge, its model, requests, cache hits, ties."""
    lines = []
    for stage, ev in evals.items():
        if "judge_tokens" not in ev:
            continue
        lines.append(f"judge ({stage}): {ev.get('judge')} ({ev.get('judge_model')}), n={ev.get('n_judged')}, "
                     f"{ev.get('judge_requests')} new requests, {ev.get('judge_cached')} cached, "
                     f"{ev.get('n_ties')} identical outputs; LC: {ev.get('lc_method')}")
    return lines
