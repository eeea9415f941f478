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

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ibridge.judging.names import LC_GLM
from ibridge.terminal import wrap

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


# Short headers, so that the table fits 80 columns; the caption spells them out.
HEADERS = ("stage", "gold", "gold win", "judged ± se", "n", "LC win", "tokens", "cost")
CAPTION = ("gold: gold reward; gold win: win rate under the gold judge; judged ± se: win rate under the "
           "AlpacaEval judge ± its standard error; n: prompts judged; LC win: length-controlled win rate "
           "(*: AlpacaEval 2's GLM); tokens, cost: the judge's")


def judged_table(results: dict) -> Table | None:
    """Gold and judged win rates side by side, one row per judged stage; None when none was judged.
    Numbers are never cut or wrapped (a narrow terminal wraps the stage name and the caption)."""
    stages = _stages(results)
    if not stages:
        return None
    rows = []
    for stage, ev in stages.items():
        judged_rate = _num(ev.get("win_rate"))
        if judged_rate != "—" and ev.get("win_rate_se") is not None:
            judged_rate += f" ± {_num(ev['win_rate_se'])}"
        lc = _num(ev.get("lc_win_rate")) + ("*" if ev.get("lc_method") == LC_GLM else "")
        rows.append([stage, _num(ev.get("gold_reward")), _num(ev.get("gold_win_rate")), judged_rate,
                     str(ev.get("n_judged", "—")), lc, _num(ev.get("judge_tokens"), ","), _cost(ev)])
    table = Table(title="gold vs AlpacaEval judge", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  pad_edge=False, padding=(0, 1, 0, 0), caption=CAPTION, caption_justify="left")
    table.add_column(HEADERS[0], overflow="fold", min_width=5)
    for i, header in enumerate(HEADERS[1:], start=1):
        table.add_column(header, justify="right", no_wrap=True,
                         min_width=max(len(header), *(len(row[i]) for row in rows)))
    for row in rows:
        table.add_row(*(escape(value) for value in row))
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
    for note in judge_notes(results):  # wrapped between words, continuation lines indented
        indent = note[:len(note) - len(note.lstrip())]
        for line in wrap(note.strip(), console.width, indent=indent):
            console.print(escape(line), soft_wrap=True)
