"""A sweep's report: mean ± standard error over seeds per cell, plots, failed runs.

    ibridge report                          # the newest sweep under multirun/
    ibridge report report.path=multirun/2025-01-01/12-00-00
    python -m ibridge.analysis.report [SWEEP_DIR [OUT_DIR]]

A sweep folder holds one run folder per Hydra job, each with ``results.json``
(written last by the CLI) and usually ``config.yaml``. A *cell* is one SFT
objective and SFT learning rate (plus any other override that varies, e.g.
``objective.beta``); its runs over seeds are aggregated as mean ± standard
error. Only completed runs enter the numbers; failed runs (and run folders
without ``results.json``: killed or still running) are listed with their
error, and a cell with no completed run is shown as failed, never dropped.

Writes into the output folder (default: the sweep folder) ``report.md``,
``report.json`` and three PNGs (see :data:`PLOTS`), and prints the table.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from ibridge.evaluation.stats import mean_and_stderr
from ibridge.io import write_json_atomic

__all__ = ["COLUMNS", "PLOTS", "load_runs", "newest_sweep", "write_report"]

PLOTS = {
    "dpo_win_rate_vs_lr": "dpo_win_rate_vs_lr.png",
    "kl_vs_lr": "kl_vs_lr.png",
    "sft_vs_dpo_win_rate": "sft_vs_dpo_win_rate.png",
    "paired_effects": "paired_effects.png",
}

# Paired comparisons with the baseline cell (ibridge/analysis/effects.py) in report.md.
EFFECT_METRICS = {"eval.dpo.win_rate": "Post-DPO win rate", "eval.dpo.gold_reward": "Post-DPO gold reward"}

# Overrides that identify a cell's objective / lr / seed; every other override
# that differs between runs (objective.beta, dpo.lr, ...) also splits cells.
_IDENTITY_KEYS = ("objective", "lr", "seed")


@dataclass(frozen=True)
class Column:
    key: str  # "<group>.<stage>.<metric>" into a cell's aggregated metrics
    header: str  # Markdown header
    fmt: str

    @property
    def path(self) -> tuple[str, str, str]:
        group, stage, metric = self.key.split(".")
        return group, stage, metric


_OUTCOMES = ("win_rate", "lc_win_rate", "gold_reward")

# The table's metric columns: post-SFT is evaluated against the base model as
# reference, post-DPO against the SFT model it started from.
COLUMNS = (
    Column("eval.sft.win_rate", "SFT win", ".3f"),
    Column("eval.dpo.win_rate", "DPO win", ".3f"),
    Column("eval.sft.lc_win_rate", "SFT LC win", ".3f"),
    Column("eval.dpo.lc_win_rate", "DPO LC win", ".3f"),
    Column("eval.sft.gold_reward", "SFT gold", ".3f"),
    Column("eval.dpo.gold_reward", "DPO gold", ".3f"),
    Column("eval.sft.kl_to_ref", "KL SFT‖base", ".2f"),
    Column("eval.dpo.kl_to_ref", "KL DPO‖SFT", ".2f"),
    Column("train.sft.kl_token", "KL/token SFT", ".3f"),
    Column("eval.sft.implicit_reward_acc", "SFT IR acc", ".3f"),
    Column("eval.dpo.implicit_reward_acc", "DPO IR acc", ".3f"),
)


# --------------------------------------------------------------------------- loading


@dataclass
class Run:
    path: Path
    status: str  # completed | failed | incomplete (no results.json) | whatever the file says
    error: str | None
    objective: str
    lr: float | str | None
    seed: int
    extra: tuple[str, ...]  # other overrides, "key=value", sorted
    results: dict = field(default_factory=dict, repr=False)

    @property
    def completed(self) -> bool:
        return self.status == "completed"


def _read_yaml(path: Path) -> dict | list | None:
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None


def _select(tree, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    parsed = {}
    for item in overrides or ():
        key, sep, value = str(item).partition("=")
        if sep:
            parsed[key.lstrip("+~")] = value
    return parsed


def _as_lr(value) -> float | str | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(f"{float(value):.10g}")  # 1e-3, "1.0e-3" and 0.001 are one cell
    except (TypeError, ValueError):
        return str(value)


def _as_seed(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _first(*values):
    return next((v for v in values if v is not None and v != ""), None)


def _identify(run_dir: Path, results: dict) -> tuple[str, float | str | None, int, tuple[str, ...]]:
    """(SFT objective, SFT lr, seed, other overrides) from stages, config, then overrides."""
    config = _read_yaml(run_dir / "config.yaml") or {}
    composed = _read_yaml(run_dir / ".hydra" / "config.yaml") or {}  # written by Hydra before validation
    overrides = results.get("overrides")
    if overrides is None:
        overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml") or []
    parsed = _parse_overrides(overrides)
    sft = (results.get("stages") or {}).get("sft") or {}
    objective = _first(sft.get("objective"), _select(config, "objective.name"),
                       _select(composed, "objective.name"), parsed.get("objective"), "sft")
    lr = _as_lr(_first(sft.get("lr"), _select(config, "lr"), _select(composed, "lr"), parsed.get("lr")))
    seed = _as_seed(_first(_select(config, "seed"), _select(composed, "seed"), parsed.get("seed")))
    extra = tuple(sorted(f"{k}={v}" for k, v in parsed.items() if k not in _IDENTITY_KEYS))
    return str(objective), lr, 0 if seed is None else seed, extra


def load_runs(sweep_dir: Path) -> list[Run]:
    """Every run under `sweep_dir`: each results.json, and each Hydra job folder without one."""
    sweep_dir = Path(sweep_dir)
    runs = []
    for path in sorted(sweep_dir.rglob("results.json")):
        try:
            results = json.loads(path.read_text())
            if not isinstance(results, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            results = {"status": "failed", "error": f"unreadable results.json: {err}"}
        status = str(results.get("status", "unknown"))
        error = results.get("error")
        if status != "completed" and not error:
            error = f"status {status!r} without an error message"
        runs.append(Run(path.parent, status, error, *_identify(path.parent, results), results=results))
    seen = {run.path for run in runs}
    for path in sorted(sweep_dir.rglob("overrides.yaml")):
        run_dir = path.parent.parent
        if path.parent.name != ".hydra" or run_dir in seen or any(p in seen for p in run_dir.parents):
            continue
        error = "no results.json: the run was killed or is still running"
        runs.append(Run(run_dir, "incomplete", error, *_identify(run_dir, {}), results={}))
    return runs


def _sweep_of(results_json: Path, root: Path) -> Path:
    """The sweep folder a results.json belongs to: the one with Hydra's multirun.yaml."""
    for folder in results_json.parents:
        if (folder / "multirun.yaml").is_file():
            return folder
        if folder == root:
            break
    parts = results_json.relative_to(root).parts  # <date>/<time>/<cell>/results.json
    if len(parts) >= 4:
        return root / parts[0] / parts[1]
    if len(parts) == 3:
        return root / parts[0]
    return root


def newest_sweep(root: Path = Path("multirun")) -> Path:
    """The most recently modified sweep folder under `root` with results.json files below it."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}/ does not exist: run a sweep first (ibridge -m ...) or name one")
    latest: dict[Path, float] = {}
    for results_json in root.rglob("results.json"):
        sweep = _sweep_of(results_json, root)
        mtime = max(results_json.stat().st_mtime, sweep.stat().st_mtime)
        latest[sweep] = max(latest.get(sweep, mtime), mtime)
    if not latest:
        raise FileNotFoundError(f"no results.json under {root}/: run a sweep first (ibridge -m ...) or name one")
    return max(latest, key=lambda sweep: (latest[sweep], str(sweep)))


# --------------------------------------------------------------------------- aggregation


@dataclass
class Cell:
    objective: str
    lr: float | str | None
    extra: tuple[str, ...]
    runs: list[Run] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # group -> stage -> metric -> {mean, se, n}

    @property
    def completed(self) -> list[Run]:
        return [run for run in self.runs if run.completed]

    @property
    def failed(self) -> list[Run]:
        return [run for run in self.runs if not run.completed]

    @property
    def status(self) -> str:
        if not self.failed:
            return "ok"
        if not self.completed:
            return "failed"
        return f"{len(self.failed)}/{len(self.runs)} failed"

    @property
    def error(self) -> str | None:
        errors = list(dict.fromkeys(_one_line(run.error or "") for run in self.failed))
        if not errors:
            return None
        return errors[0] + (f" (+{len(errors) - 1} other errors)" if len(errors) > 1 else "")

    def stat(self, key: str) -> dict | None:
        return _select(self.metrics, key)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _numbers(mapping) -> dict[str, float]:
    if not isinstance(mapping, dict):
        return {}
    return {k: float(v) for k, v in mapping.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _run_scalars(results: dict) -> dict:
    by_stage = dict(results.get("eval_by_stage") or {})
    if "dpo" not in by_stage and results.get("eval") and results.get("job", "pipeline") == "pipeline":
        by_stage["dpo"] = results["eval"]  # `eval` is the post-DPO model's
    return {
        "eval": {stage: _numbers(metrics) for stage, metrics in by_stage.items()},
        "train": {stage: _numbers(record) for stage, record in (results.get("stages") or {}).items()},
    }


def _aggregate(runs: list[Run]) -> dict:
    values: dict = {}
    for run in runs:
        for group, stages in _run_scalars(run.results).items():
            for stage, metrics in stages.items():
                for name, value in metrics.items():
                    values.setdefault(group, {}).setdefault(stage, {}).setdefault(name, []).append(value)
    out: dict = {}
    for group, stages in values.items():
        for stage, metrics in stages.items():
            for name, vals in metrics.items():
                mean, se = mean_and_stderr(np.array(vals))
                out.setdefault(group, {}).setdefault(stage, {})[name] = {
                    "mean": mean, "se": se if math.isfinite(se) else None, "n": len(vals),
                }
    return out


def _lr_order(lr) -> tuple:
    if isinstance(lr, float):
        return (0, lr, "")
    return (1, 0.0, "" if lr is None else str(lr))


def build_cells(runs: list[Run]) -> list[Cell]:
    cells: dict[tuple, Cell] = {}
    for run in runs:
        key = (run.objective, run.lr, run.extra)
        cells.setdefault(key, Cell(run.objective, run.lr, run.extra)).runs.append(run)
    ordered = sorted(cells.values(), key=lambda c: (c.objective, _lr_order(c.lr), c.extra))
    for cell in ordered:
        cell.runs.sort(key=lambda run: (run.seed, str(run.path)))
        cell.metrics = _aggregate(cell.completed)
    return ordered


def _varying_extras(cells: list[Cell] | list[Run]) -> dict[int, str]:
    """Per cell (or run), the other overrides that are not common to all of them ("" if none)."""
    common = set.intersection(*(set(c.extra) for c in cells)) if cells else set()
    return {id(c): ",".join(e for e in c.extra if e not in common) for c in cells}


# --------------------------------------------------------------------------- formatting


def _fmt_lr(lr) -> str:
    return "—" if lr is None else (f"{lr:g}" if isinstance(lr, float) else str(lr))


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


def _row(cell: Cell, extras: dict[int, str], show_extra: bool, limit: int | None, pm: str = " ± ",
         columns: tuple[Column, ...] = COLUMNS) -> list[str]:
    n = len(cell.completed)
    row = [cell.objective, _fmt_lr(cell.lr)]
    if show_extra:
        row.append(extras[id(cell)] or "—")
    row += [_fmt_seeds(cell), str(n), _status_text(cell, limit)]
    row += [_fmt_stat(cell.stat(col.key), col.fmt, n, pm) for col in columns]
    return row


def _headers(show_extra: bool, columns: tuple[Column, ...] = COLUMNS) -> list[str]:
    return ["objective", "SFT lr", *(["overrides"] if show_extra else []), "seeds", "n", "status",
            *(col.header for col in columns)]


def _md_escape(text: str) -> str:
    return _one_line(text).replace("|", "\\|")


def _markdown(sweep_dir: Path, cells: list[Cell], runs: list[Run], plots: dict[str, Path], effects: dict) -> str:
    extras = _varying_extras(cells)
    show_extra = any(extras.values())
    headers = _headers(show_extra)
    n_failed = sum(not run.completed for run in runs)
    lines = [
        f"# Sweep report: `{sweep_dir}`",
        "",
        f"{len(cells)} cells, {len(runs)} runs, {n_failed} failed. Each entry is the mean ± standard error "
        "over the completed seeds of a cell (just the mean when n = 1; `(n=k)` when a metric exists for "
        "fewer runs). Failed runs do not enter the numbers. Post-SFT metrics are measured against the "
        "base model as reference (`KL SFT‖base`, `SFT IR acc`), post-DPO ones against the SFT model "
        "(`KL DPO‖SFT`, `DPO IR acc`); win rates are against the fixed reference outputs; "
        "`KL/token SFT` is the SFT stage's final exact per-token KL to the base model.",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if i < len(headers) - len(COLUMNS) else "---:" for i in range(len(headers))) + "|",
    ]
    for cell in cells:
        row = _row(cell, extras, show_extra, limit=120)
        if cell.status == "failed":
            row = [f"**{row[0]}**", *row[1:]]
        lines.append("| " + " | ".join(_md_escape(value) for value in row) + " |")
    failed = [run for run in runs if not run.completed]
    lines += ["", "## Failed runs", ""]
    if not failed:
        lines.append("None.")
    for run in failed:
        lines.append(f"- `{_rel(run.path, sweep_dir)}` (objective {run.objective}, lr {_fmt_lr(run.lr)}, "
                     f"seed {run.seed}, {run.status}): {_md_escape(run.error or '')}")
    from ibridge.analysis.effects import effects_markdown  # it builds on this module

    effect_lines = []
    for metric, title in EFFECT_METRICS.items():
        effect_lines += effects_markdown(effects[metric], title)
    if effect_lines:
        lines += ["", "## Against the baseline (plain sft at the standard lr)", "", *effect_lines]
    lines += ["", "## Plots", ""]
    titles = {
        "dpo_win_rate_vs_lr": "Post-DPO win rate against the SFT learning rate",
        "kl_vs_lr": "KL drift against the SFT learning rate",
        "sft_vs_dpo_win_rate": "Post-SFT against post-DPO win rate",
        "paired_effects": "Post-DPO win rate against plain sft at the standard lr, paired by seed",
    }
    for name, path in plots.items():
        lines += [f"- [{titles[name]}]({path.name})", "", f"  ![{titles[name]}]({path.name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base)) or "."
    except ValueError:
        return str(path)


def _console_table(title: str, cells: list[Cell], columns: tuple[Column, ...]) -> Table:
    extras = _varying_extras(cells)
    show_extra = any(extras.values())
    table = Table(title=title)
    headers = _headers(show_extra, columns)
    for i, header in enumerate(headers):
        if i >= len(headers) - len(columns):  # metrics: "mean ±se" breaks before ± when narrow
            table.add_column(header.replace(" ", "\n", 1), justify="right", min_width=6)
        elif header == "status":  # the full errors follow the table
            table.add_column(header, overflow="fold", min_width=10, max_width=32)
        else:
            table.add_column(header, no_wrap=True)
    for cell in cells:
        style = {"ok": None, "failed": "red"}.get(cell.status, "yellow")
        row = _row(cell, extras, show_extra, limit=60, pm=" ±", columns=columns)
        table.add_row(*(escape(value) for value in row), style=style)
    return table


def _print_console(console: Console, sweep_dir: Path, cells: list[Cell], runs: list[Run]) -> None:
    """One table, or two (outcomes, drift) when one is wider than the console; then the errors."""
    title = f"sweep report — {sweep_dir} (mean ± se over seeds)"
    table = _console_table(title, cells, COLUMNS)
    wide = console.options.update(width=100_000, max_width=100_000)
    if Measurement.get(console, wide, table).maximum <= console.width:
        console.print(table)
    else:
        outcomes = tuple(col for col in COLUMNS if col.key.rsplit(".", 1)[1] in _OUTCOMES)
        drift = tuple(col for col in COLUMNS if col not in outcomes)
        console.print(_console_table(f"{title}: win rate and gold reward", cells, outcomes))
        console.print(_console_table(f"{title}: KL drift and implicit-reward accuracy", cells, drift))
    for run in runs:
        if not run.completed:
            console.print(f"[red]{escape(run.status)} {escape(_rel(run.path, sweep_dir))}: "
                          f"{escape(_one_line(run.error or ''))}[/red]")


# --------------------------------------------------------------------------- plots


def _series(cells: list[Cell]) -> dict[str, list[Cell]]:
    """Cells by plotted line: objective, plus the other overrides that vary."""
    extras = _varying_extras(cells)
    series: dict[str, list[Cell]] = {}
    for cell in cells:
        label = cell.objective + (f" ({extras[id(cell)]})" if extras[id(cell)] else "")
        series.setdefault(label, []).append(cell)
    return series


def _colors(labels: Iterable[str]) -> dict[str, tuple[str, str]]:
    """A colour and a marker per series, so overlapping lines stay distinguishable."""
    markers = "osD^vPX*"
    return {label: (f"C{i % 10}", markers[i % len(markers)]) for i, label in enumerate(labels)}


def _points(cells: list[Cell], key: str) -> tuple[list[float], list[float], list[float]]:
    xs, ys, es = [], [], []
    for cell in cells:
        stat = cell.stat(key)
        if stat and isinstance(cell.lr, float) and cell.lr > 0:
            xs.append(cell.lr)
            ys.append(stat["mean"])
            es.append(stat["se"] or 0.0)
    order = np.argsort(xs)
    return [xs[i] for i in order], [ys[i] for i in order], [es[i] for i in order]


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no completed cell has this metric", ha="center", va="center",
            transform=ax.transAxes, color="gray")
    ax.tick_params(which="both", labelbottom=False, labelleft=False)


def _lr_axis(ax, lrs: set[float]) -> None:
    ax.set_xscale("log")
    ax.set_xlabel("SFT learning rate (log scale)")
    if lrs:
        ax.xaxis.set_major_locator(FixedLocator(sorted(lrs)))
        ax.xaxis.set_major_formatter(lambda value, _pos: f"{value:g}")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        low, high = min(lrs), max(lrs)
        ax.set_xlim(low / 1.6, high * 1.6)
    ax.grid(True, alpha=0.3)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path


def _plot_vs_lr(ax, cells: list[Cell], key: str, colors: dict[str, tuple[str, str]]) -> set[float]:
    lrs: set[float] = set()
    series = _series(cells)
    for i, (label, group) in enumerate(series.items()):
        xs, ys, es = _points(group, key)
        if xs:
            dodge = 10 ** (0.015 * (i - (len(series) - 1) / 2))  # keep equal points' error bars apart
            color, marker = colors[label]
            ax.errorbar([x * dodge for x in xs], ys, yerr=es, marker=marker, capsize=3, label=label, color=color)
            lrs.update(xs)
    if lrs:
        ax.legend(title="SFT objective", fontsize=8, title_fontsize=8)
    else:
        _no_data(ax)
    _lr_axis(ax, lrs)
    return lrs


def plot_dpo_win_rate_vs_lr(cells: list[Cell], path: Path) -> Path:
    colors = _colors(_series(cells))
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    _plot_vs_lr(ax, cells, "eval.dpo.win_rate", colors)
    ax.set_ylabel("post-DPO win rate vs reference outputs")
    ax.set_title("Post-DPO win rate by SFT learning rate\n(mean ± standard error over seeds)", fontsize=10)
    return _save(fig, path)


def plot_kl_vs_lr(cells: list[Cell], path: Path) -> Path:
    colors = _colors(_series(cells))
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    _plot_vs_lr(left, cells, "eval.sft.kl_to_ref", colors)
    left.set_ylabel("sampled sequence KL (nats)")
    left.set_title("after SFT: KL(π_SFT ‖ π_base)", fontsize=10)
    _plot_vs_lr(right, cells, "eval.dpo.kl_to_ref", colors)
    right.set_ylabel("sampled sequence KL (nats)")
    right.set_title("after DPO: KL(π_DPO ‖ π_SFT)", fontsize=10)
    fig.suptitle("KL drift by SFT learning rate (mean ± standard error over seeds)", fontsize=11)
    return _save(fig, path)


def plot_sft_vs_dpo(cells: list[Cell], path: Path) -> Path:
    series = _series(cells)
    colors = _colors(series)
    fig = Figure(figsize=(6.4, 5.6), layout="constrained")
    ax = fig.add_subplot()
    values: list[float] = []
    notes: dict[tuple[float, float], list[str]] = {}  # cells at the same point share one label
    for label, group in series.items():
        first = True
        for cell in group:
            sft, dpo = cell.stat("eval.sft.win_rate"), cell.stat("eval.dpo.win_rate")
            if not (sft and dpo):
                continue
            color, marker = colors[label]
            ax.errorbar(sft["mean"], dpo["mean"], xerr=sft["se"] or 0.0, yerr=dpo["se"] or 0.0, fmt=marker,
                        capsize=3, color=color, label=label if first else None)
            # The legend names objective and overrides; the label adds the lr (when it varies).
            notes.setdefault((round(sft["mean"], 3), round(dpo["mean"], 3)), []).append(_fmt_lr(cell.lr))
            values += [sft["mean"], dpo["mean"]]
            first = False
    if len({cell.lr for cell in cells}) > 1:
        for point, labels in notes.items():
            ax.annotate("\n".join(labels), point, xytext=(5, 4), textcoords="offset points", fontsize=7,
                        va="bottom")
    if values:
        low, high = min(values), max(values)
        pad = max(0.05, 0.1 * (high - low))
        low, high = max(0.0, low - pad), min(1.0, high + pad)
        ax.plot([low, high], [low, high], ls="--", color="gray", lw=1, label="DPO = SFT")
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
        if len(series) > 6:  # many series: the legend goes beside the axes, not over the points
            fig.set_size_inches(9.6, 5.6)
            ax.legend(title="SFT objective", fontsize=7, title_fontsize=8, loc="upper left",
                      bbox_to_anchor=(1.02, 1.0))
        else:
            ax.legend(title="SFT objective", fontsize=8, title_fontsize=8)
    else:
        _no_data(ax)
    ax.set_xlabel("post-SFT win rate")
    ax.set_ylabel("post-DPO win rate")
    ax.set_title("Win rate after SFT and after DPO, one point per cell\n"
                 "(labels: SFT lr where it varies; bars: standard error)", fontsize=10)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------- report


def _cell_json(cell: Cell, sweep_dir: Path, extra: str) -> dict:
    return {
        "objective": cell.objective,
        "lr": cell.lr,
        "overrides": list(cell.extra),
        "varying_overrides": extra,
        "seeds": sorted({run.seed for run in cell.runs}),
        "runs": len(cell.runs),
        "completed": len(cell.completed),
        "failed": len(cell.failed),
        "status": cell.status,
        "error": cell.error,
        "run_status": [
            {"run": _rel(run.path, sweep_dir), "seed": run.seed, "status": run.status, "error": run.error}
            for run in cell.runs
        ],
        "metrics": cell.metrics,
    }


def _effect_json(effect) -> dict:
    return {"objective": effect.objective, "lr": effect.lr, "mean": effect.mean, "se": effect.se,
            "relative": effect.relative, "units": list(effect.units), "per_block": effect.per_block}


def write_report(sweep_dir: Path, out_dir: Path | None = None, console: Console | None = None) -> dict:
    """Write report.md, report.json and the PNGs for `sweep_dir`; print the table.

    Returns what report.json holds: per cell its objective, lr, seeds, status,
    errors and ``metrics[group][stage][metric] = {mean, se, n}`` (group ``eval``:
    ``eval_by_stage``; group ``train``: the ``stages`` records), plus the paths
    written under ``files``.
    """
    from ibridge.analysis.effects import paired_effects, plot_effects  # it builds on this module

    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: no such folder")
    runs = load_runs(sweep_dir)
    if not runs:
        raise FileNotFoundError(f"{sweep_dir}: no results.json (nor Hydra run folder) below it")
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = build_cells(runs)
    effects = {metric: paired_effects(runs, metric) for metric in EFFECT_METRICS}

    plots = {
        "dpo_win_rate_vs_lr": plot_dpo_win_rate_vs_lr(cells, out_dir / PLOTS["dpo_win_rate_vs_lr"]),
        "kl_vs_lr": plot_kl_vs_lr(cells, out_dir / PLOTS["kl_vs_lr"]),
        "sft_vs_dpo_win_rate": plot_sft_vs_dpo(cells, out_dir / PLOTS["sft_vs_dpo_win_rate"]),
        "paired_effects": plot_effects(effects["eval.dpo.win_rate"], out_dir / PLOTS["paired_effects"]),
    }
    report_md = out_dir / "report.md"
    report_json = out_dir / "report.json"
    extras = _varying_extras(cells)
    payload = {
        "sweep": str(sweep_dir),
        "cells": [_cell_json(cell, sweep_dir, extras[id(cell)]) for cell in cells],
        "n_cells": len(cells),
        "n_runs": len(runs),
        "n_failed_runs": sum(not run.completed for run in runs),
        "n_failed_cells": sum(cell.status == "failed" for cell in cells),
        "columns": {col.key: col.header for col in COLUMNS},
        "effects": {metric: [_effect_json(effect) for effect in found] for metric, found in effects.items()},
        "files": {"report_md": str(report_md), "report_json": str(report_json),
                  **{name: str(path) for name, path in plots.items()}},
    }
    report_md.write_text(_markdown(sweep_dir, cells, runs, plots, effects), encoding="utf-8")
    write_json_atomic(report_json, payload)

    console = console or Console(width=None if sys.stdout.isatty() else 240)
    _print_console(console, sweep_dir, cells, runs)
    console.print(f"report: {escape(str(report_md))} (+ report.json, {len(plots)} plots)")
    return payload


if __name__ == "__main__":
    args = sys.argv[1:]
    sweep = Path(args[0]) if args else newest_sweep()
    write_report(sweep, Path(args[1]) if len(args) > 1 else None)
