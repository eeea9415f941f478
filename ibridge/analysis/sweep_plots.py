"""A sweep report's figures: outcomes against the SFT learning rate, post-SFT against
post-DPO win rate, and the paired effects (PNG, matplotlib without pyplot).

Cells are drawn as series by objective plus the other overrides that vary across the
sweep (:func:`ibridge.analysis.runs.varying_keys`), whatever they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

from ibridge.analysis.effects import Effect
from ibridge.analysis.plots import save_figure
from ibridge.analysis.runs import Cell, fmt_lr, varying_keys, varying_label

__all__ = ["plot_dpo_win_rate_vs_lr", "plot_effects", "plot_kl_vs_lr", "plot_sft_vs_dpo"]


def _series(cells: list[Cell]) -> dict[str, list[Cell]]:
    """Cells by plotted line: objective, plus the other overrides that vary."""
    keys = varying_keys(cells)
    series: dict[str, list[Cell]] = {}
    for cell in cells:
        extra = varying_label(cell, keys)
        series.setdefault(cell.objective + (f" ({extra})" if extra else ""), []).append(cell)
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
    return save_figure(fig, path, dpi=120)


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
            notes.setdefault((round(sft["mean"], 3), round(dpo["mean"], 3)), []).append(fmt_lr(cell.lr))
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


def plot_effects(effects: list[Effect], path: Path) -> Path:
    """One column per compared cell: each block's paired difference (small markers) and the
    mean with its 95% t-interval (black); above the zero line means better than the baseline."""
    fig = Figure(figsize=(max(5.0, 1.1 * len(effects) + 2.5), 4.4), layout="constrained")
    ax = fig.add_subplot()
    if not effects:
        _no_data(ax)
        return _save(fig, path)
    labels = sorted({label for effect in effects for label in effect.per_block})
    markers = "osD^vPX*"
    for x, effect in enumerate(effects):
        for i, label in enumerate(labels):
            if label in effect.per_block:
                ax.plot(x + 0.12 * (i - (len(labels) - 1) / 2), effect.per_block[label], markers[i % len(markers)],
                        color=f"C{i % 10}", alpha=0.7, ms=5, label=(label or "all runs") if x == 0 else None)
        # The 95% t-interval the report reads (ibridge/analysis/significance.py), not ± se: with
        # 3 bases it is 4.3 standard errors wide on each side.
        half = 0.0 if effect.ci_high is None else effect.ci_high - effect.mean
        ax.errorbar(x, effect.mean, yerr=half, fmt="_", color="black", ms=22, mew=2, capsize=5,
                    elinewidth=1.5, label="mean, 95% interval" if x == 0 else None)
    ax.axhline(0.0, color="gray", lw=1, ls="--")
    ticks = ["\n".join([e.objective, fmt_lr(e.lr), *e.settings]) for e in effects]
    ax.set_xticks(range(len(effects)), ticks, fontsize=8)
    ax.set_xlim(-0.6, len(effects) - 0.4)
    metric = effects[0].metric.split(".")[-1].replace("_", " ")
    ax.set_ylabel(f"Δ post-DPO {metric} vs baseline")
    baseline = {"sft": "plain sft at the standard lr", "tv": "tv at the same lr and granularity"}[effects[0].baseline]
    ax.set_title(f"Paired by seed against {baseline}\n"
                 "(small markers: per block; black: mean and 95% t-interval over blocks)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)
