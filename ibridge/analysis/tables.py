"""A sweep report's tables: the Markdown of report.md and the console table.

One row per cell (:mod:`ibridge.analysis.runs`): its objective, SFT lr, one column per
other override that varies across the sweep, its seeds and status, then the metric
columns of :data:`COLUMNS` as mean ± standard error over seeds; then the paired effects
(:mod:`ibridge.analysis.effects`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from ibridge.analysis.effects import BASELINES, Effect
from ibridge.analysis.runs import Cell, Run, fmt_lr, one_line, varying_keys
from ibridge.analysis.significance import RULE

__all__ = ["COLUMNS", "Column", "effects_markdown", "inference_cells", "print_console", "report_markdown"]


@dataclass(frozen=True)
class Column:
    key: str  # "<group>.<stage>.<metric>" into a cell's aggregated metrics
    header: str  # Markdown header
    fmt: str


_OUTCOMES = ("win_rate", "lc_win_rate", "gold_reward", "gold_win_rate")

# The table's metric columns: post-SFT is evaluated against the base model as
# reference, post-DPO against the SFT model it started from. "1-model LC": ibridge's
# length control is one logistic fit per model (evaluation/stats.py), not AlpacaEval 2's.
COLUMNS = (
    Column("eval.sft.win_rate", "SFT win", ".3f"),
    Column("eval.dpo.win_rate", "DPO win", ".3f"),
    Column("eval.sft.lc_win_rate", "SFT 1-model LC win", ".3f"),
    Column("eval.dpo.lc_win_rate", "DPO 1-model LC win", ".3f"),
    Column("eval.sft.gold_reward", "SFT gold", ".3f"),
    Column("eval.dpo.gold_reward", "DPO gold", ".3f"),
    Column("eval.sft.kl_to_ref", "KL SFT‖base", ".2f"),
    Column("eval.dpo.kl_to_ref", "KL DPO‖SFT", ".2f"),
    Column("train.sft.kl_token", "KL/token SFT", ".3f"),
    Column("eval.sft.implicit_reward_acc", "SFT IR acc", ".3f"),
    Column("eval.dpo.implicit_reward_acc", "DPO IR acc", ".3f"),
)

# Runs judged with judge=alpaca_eval (ibridge/judging): their win rates are the judge's, and the toy
# world's gold judge's win rates go beside them, when the sweep has them.
JUDGED_COLUMNS = (
    Column("eval.sft.gold_win_rate", "SFT gold win", ".3f"),
    Column("eval.dpo.gold_win_rate", "DPO gold win", ".3f"),
)
JUDGED_NOTE = ("Win rates are the AlpacaEval judge's (judge=alpaca_eval: mean P(the model's output is better), "
               "results.json has its standard error, n, tokens and cost); `gold win` is the toy world's gold "
               "judge's win rate on the same outputs. On all 805 AlpacaEval prompts (eval_set=alpaca_eval) the LC "
               "columns hold AlpacaEval 2's own LC win rate instead (each run's `lc_method` says which).")


def columns_for(cells: list[Cell]) -> tuple[Column, ...]:
    """:data:`COLUMNS`, with the gold win rates after the win rates when some cell was judged."""
    if not any(cell.stat(col.key) for cell in cells for col in JUDGED_COLUMNS):
        return COLUMNS
    return COLUMNS[:2] + JUDGED_COLUMNS + COLUMNS[2:]


INTRO = (
    "Each entry is the mean ± standard error over the completed seeds of a cell (just the mean when "
    "n = 1; `(n=k)` when a metric exists for fewer runs). Failed runs do not enter the numbers. Post-SFT "
    "metrics are measured against the base model as reference (`KL SFT‖base`, `SFT IR acc`), post-DPO "
    "ones against the SFT model (`KL DPO‖SFT`, `DPO IR acc`); win rates are against the fixed reference "
    "outputs; `KL/token SFT` is the SFT stage's final exact per-token KL to the base model. "
    "`1-model LC win` is ibridge's length-controlled win rate: one logistic fit of the preferences on "
    "tanh(length difference / sd) per model, read at equal length; unlike AlpacaEval 2's LC win rate it "
    "has no instruction-difficulty term and no joint fit over models, so it is not comparable with "
    "AlpacaEval 2 numbers. In the toy world the gold reward itself penalises wrong lengths (too long "
    "or cut short), so length is part of gold quality and controlling for it also removes real quality."
)


# --------------------------------------------------------------------------- cells


def _fmt_stat(stat: dict | None, fmt: str, n_cell: int, pm: str = " ± ") -> str:
    if not stat:
        return "—"
    text = format(stat["mean"], fmt)
    if stat["se"] is not None:
        text += f"{pm}{format(stat['se'], fmt)}"
    if stat["n"] != n_cell:
        text += f" (n={stat['n']})"
    return text


def _fmt_seeds(cell: Cell) -> str:
    return ",".join(str(s) for s in sorted({run.seed for run in cell.runs}))


def _status_text(cell: Cell, limit: int | None = None) -> str:
    if cell.error is None:
        return cell.status
    error = cell.error
    if limit and len(error) > limit:
        error = error[: limit - 1] + "…"
    return f"{cell.status}: {error}"


def _row(cell: Cell, keys: list[str], limit: int | None, pm: str = " ± ",
         columns: tuple[Column, ...] = COLUMNS) -> list[str]:
    n = len(cell.completed)
    row = [cell.objective, fmt_lr(cell.lr), *(cell.settings.get(key, "—") for key in keys)]
    row += [_fmt_seeds(cell), str(n), _status_text(cell, limit)]
    row += [_fmt_stat(cell.stat(col.key), col.fmt, n, pm) for col in columns]
    return row


def _headers(keys: list[str], columns: tuple[Column, ...] = COLUMNS) -> list[str]:
    return ["objective", "SFT lr", *keys, "seeds", "n", "status", *(col.header for col in columns)]


def _md_escape(text: str) -> str:
    return one_line(text).replace("|", "\\|")


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base)) or "."
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- effects


def _p_text(p: float | None) -> str:
    return "—" if p is None else (f"{p:.3f}" if p >= 0.001 else f"{p:.0e}")


def inference_cells(effect: Effect, digits: int = 3, scale: float = 1.0) -> list[str]:
    """95% CI, df, p, Holm-adjusted p and resolved (ibridge/analysis/significance.py) as text."""
    if effect.df is None:
        return ["—", "—", "—", "—", "no"]
    ci = f"[{effect.ci_low * scale:+.{digits}f}, {effect.ci_high * scale:+.{digits}f}]"
    return [ci, str(effect.df), _p_text(effect.p), _p_text(effect.p_holm), "yes" if effect.resolved else "no"]


def effects_markdown(effects: list[Effect], title: str) -> list[str]:
    """A Markdown section: one row per compared cell, its paired effect and the effect in each block."""
    if not effects:
        return []
    labels = sorted({label for effect in effects for label in effect.per_block})
    per_block_columns = labels if len(labels) > 1 else []
    unit = "blocks" if per_block_columns else "seeds"
    setting_keys = list(dict.fromkeys(item.partition("=")[0] for e in effects for item in e.settings))
    baseline = {"sft": "plain sft at the largest lr", "tv": "tv at the same lr and granularity"}[effects[0].baseline]
    lines = [
        f"### {title}",
        "",
        f"Paired by seed with {baseline} of the same block and settings; mean ± se over "
        f"{'blocks (' + ', '.join(per_block_columns) + ')' if per_block_columns else 'the paired seeds'}.",
        "",
        "| " + " | ".join(["objective", "SFT lr", *setting_keys, "Δ vs baseline", "95% CI", "df", "p", "p (Holm)",
                          "resolved", "relative", f"{unit} above 0", *per_block_columns]) + " |",
        "|---|---|" + "---|" * len(setting_keys) + "---:|" * 8 + "---:|" * len(per_block_columns),
    ]
    for effect in effects:
        settings = dict(item.partition("=")[::2] for item in effect.settings)
        se = f" ± {effect.se:.3f}" if effect.se is not None else ""
        rel = f"{100 * effect.relative:+.1f}%" if effect.relative is not None else "—"
        row = [effect.objective, fmt_lr(effect.lr), *(settings.get(key, "—") for key in setting_keys),
               f"{effect.mean:+.3f}{se}", *inference_cells(effect), rel, f"{effect.units_above}/{len(effect.units)}"]
        row += [f"{effect.per_block[label]:+.3f}" if label in effect.per_block else "—" for label in per_block_columns]
        lines.append("| " + " | ".join(_md_escape(value) for value in row) + " |")
    return lines + [""]


# --------------------------------------------------------------------------- report.md


def report_markdown(sweep_dir: Path, cells: list[Cell], runs: list[Run], plots: dict[str, tuple[str, Path]],
                    effects: dict[str, dict[str, list[Effect]]], metric_titles: dict[str, str]) -> str:
    """report.md: the table, failed runs, paired effects by baseline and metric, links to the plots.

    `plots` maps a name to (title, path); `effects[baseline][metric]` as from
    :func:`ibridge.analysis.effects.paired_effects`.
    """
    keys = varying_keys(cells)
    columns = columns_for(cells)
    headers = _headers(keys, columns)
    n_failed = sum(not run.completed for run in runs)
    note = f" {JUDGED_NOTE}" if columns != COLUMNS else ""
    lines = [
        f"# Sweep report: `{sweep_dir}`",
        "",
        f"{len(cells)} cells, {len(runs)} runs, {n_failed} failed. {INTRO}{note}",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if i < len(headers) - len(columns) else "---:" for i in range(len(headers))) + "|",
    ]
    for cell in cells:
        row = _row(cell, keys, limit=120, columns=columns)
        if cell.status == "failed":
            row = [f"**{row[0]}**", *row[1:]]
        lines.append("| " + " | ".join(_md_escape(value) for value in row) + " |")
    lines += ["", "## Failed runs", ""]
    failed = [run for run in runs if not run.completed]
    if not failed:
        lines.append("None.")
    for run in failed:
        lines.append(f"- `{_rel(run.path, sweep_dir)}` (objective {run.objective}, lr {fmt_lr(run.lr)}, "
                     f"seed {run.seed}, {run.status}): {_md_escape(run.error or '')}")
    if any(found for by_metric in effects.values() for found in by_metric.values()):
        lines += ["", "## Paired effects", "", RULE]
    for baseline, by_metric in effects.items():
        section = [line for metric, title in metric_titles.items()
                   for line in effects_markdown(by_metric.get(metric, []), title)]
        if section:
            heading = "Against the baseline" if baseline == "sft" else "Against the like-for-like baseline"
            lines += ["", f"## {heading} ({BASELINES[baseline]})", "", *section]
    lines += ["", "## Plots", ""]
    for title, path in plots.values():
        lines += [f"- [{title}]({path.name})", "", f"  ![{title}]({path.name})", ""]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- console


def _console_table(title: str, cells: list[Cell], columns: tuple[Column, ...]) -> Table:
    keys = varying_keys(cells)
    table = Table(title=title)
    headers = _headers(keys, columns)
    for i, header in enumerate(headers):
        if i >= len(headers) - len(columns):  # metrics: "mean ±se" breaks before ± when narrow
            table.add_column(header.replace(" ", "\n", 1), justify="right", min_width=6)
        elif header == "status":  # the full errors follow the table
            table.add_column(header, overflow="fold", min_width=10, max_width=32)
        else:
            table.add_column(header, no_wrap=True)
    for cell in cells:
        style = {"ok": None, "failed": "red"}.get(cell.status, "yellow")
        row = _row(cell, keys, limit=60, pm=" ±", columns=columns)
        table.add_row(*(escape(value) for value in row), style=style)
    return table


def _fits(console: Console, table: Table) -> bool:
    wide = console.options.update(width=100_000, max_width=100_000)
    return Measurement.get(console, wide, table).maximum <= console.width


def _fitting_groups(console: Console, title: str, cells: list[Cell],
                    columns: tuple[Column, ...]) -> list[tuple[str, tuple[Column, ...]]]:
    """The metric columns as few tables as fit the console at their natural width (so no
    number is cut): all in one, else outcomes and drift, each split further where needed."""
    if _fits(console, _console_table(title, cells, columns)):
        return [(title, columns)]
    outcomes = tuple(col for col in columns if col.key.rsplit(".", 1)[1] in _OUTCOMES)
    drift = tuple(col for col in columns if col not in outcomes)
    groups = []
    for name, columns in (("win rate and gold reward", outcomes), ("KL drift and implicit-reward accuracy", drift)):
        parts: list[tuple[Column, ...]] = [()]
        for column in columns:
            trial = (*parts[-1], column)
            if parts[-1] and not _fits(console, _console_table(title, cells, trial)):
                parts.append((column,))  # a table of one metric column is the narrowest there is
            else:
                parts[-1] = trial
        groups += [(f"{title}: {name}" + (f" ({i + 1}/{len(parts)})" if len(parts) > 1 else ""), part)
                   for i, part in enumerate(parts)]
    return groups


def print_console(console: Console, sweep_dir: Path, cells: list[Cell], runs: list[Run]) -> None:
    """The table, as several tables when one is wider than the console; then the errors."""
    title = f"sweep report — {sweep_dir} (mean ± se over seeds)"
    for label, group in _fitting_groups(console, title, cells, columns_for(cells)):
        console.print(_console_table(label, cells, group))
    for run in runs:
        if not run.completed:
            console.print(f"[red]{escape(run.status)} {escape(_rel(run.path, sweep_dir))}: "
                          f"{escape(one_line(run.error or ''))}[/red]")


def print_effects(console: Console, effects: dict[str, dict[str, list[Effect]]],
                  metric_titles: dict[str, str]) -> None:
    """The paired effects on the terminal: one table per baseline and metric (one question each),
    with the 95% interval, p, Holm-adjusted p and resolved; the rule once, before them."""
    tables = [(baseline, metric, found) for baseline, by_metric in effects.items()
              for metric, found in by_metric.items() if found and metric in metric_titles]
    if not tables:
        return
    console.print(escape(RULE.replace("**", "")))
    for baseline, metric, found in tables:
        setting_keys = list(dict.fromkeys(item.partition("=")[0] for e in found for item in e.settings))
        table = Table(title=f"{metric_titles[metric]}: paired effects against {BASELINES[baseline]}")
        for header in ["objective", "SFT lr", *setting_keys]:
            table.add_column(header, no_wrap=True)
        for header in ["Δ ± se", "95% CI", "df", "p", "p (Holm)", "resolved"]:
            table.add_column(header, justify="right", no_wrap=True)
        for effect in found:
            settings = dict(item.partition("=")[::2] for item in effect.settings)
            se = f" ±{effect.se:.3f}" if effect.se is not None else ""
            row = [effect.objective, fmt_lr(effect.lr), *(settings.get(key, "—") for key in setting_keys),
                   f"{effect.mean:+.3f}{se}", *inference_cells(effect)]
            table.add_row(*(escape(value) for value in row), style="bold" if effect.resolved else None)
        console.print(table)
