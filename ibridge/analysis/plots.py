"""Shared matplotlib helpers: figures drawn off-screen (Agg) and saved as PNG.

Figures are built as ``matplotlib.figure.Figure`` objects on an explicit Agg canvas, never
through ``pyplot``: no display needed, nothing kept alive after saving, and no call to
``matplotlib.use`` either, so importing this module does not switch the backend of a user's
notebook or script.

    fig, axes = new_figure(ncols=2)
    plot_histograms(axes[0], {"chosen": a, "rejected": b}, xlabel="reward")
    save_figure(fig, run_dir / "plot.png")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

__all__ = [
    "COLORS",
    "group_color",
    "new_figure",
    "plot_histograms",
    "plot_mean_by_position",
    "plot_token_heatmap",
    "save_figure",
    "shorten",
]

# One colour per group, the same across figures (chosen green, rejected red, then others).
COLORS = {"chosen": "#1b9e77", "rejected": "#d95f02"}
_CYCLE = ("#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")


def group_color(name: str, index: int) -> str:
    return COLORS.get(name, _CYCLE[index % len(_CYCLE)])


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6, **kwargs):
    """``(fig, axes)``: a figure of ``nrows x ncols`` panels, each ``width x height`` inches.

    ``axes`` is a flat list (length 1 for a single panel).
    """
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, list(axes.ravel())


def save_figure(fig: Figure, path: Path, dpi: int = 150) -> Path:
    """Write ``fig`` as PNG to ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png", facecolor="white")
    return path


def shorten(text: str, width: int = 40) -> str:
    """One line of at most ``width`` characters (an ellipsis marks a cut)."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def plot_histograms(ax, groups: Mapping[str, Sequence[float]], xlabel: str, bins: int | None = None,
                    show_means: bool = True) -> None:
    """Overlaid histograms of several groups on shared bins, with dashed lines at the means.

    ``bins`` defaults to about 1.5·sqrt(n) (10 to 40) for n values in all.
    """
    arrays = {name: np.asarray(values, dtype=float) for name, values in groups.items()}
    everything = np.concatenate([a for a in arrays.values() if a.size] or [np.zeros(1)])
    if bins is None:
        bins = int(np.clip(1.5 * np.sqrt(everything.size), 10, 40))
    low, high = float(everything.min()), float(everything.max())
    if high - low < 1e-12:  # all equal (e.g. policy == reference): one bar centred on the value
        low, high = low - 0.5, high + 0.5
        bins |= 1
    edges = np.linspace(low, high, bins + 1)
    for index, (name, values) in enumerate(arrays.items()):
        color = group_color(name, index)
        label = f"{name}: n={values.size}"
        label += f", mean {values.mean():.3g} (dashed)" if show_means and values.size else ""
        ax.hist(values, bins=edges, alpha=0.45, color=color, edgecolor=color, linewidth=0.8, label=label)
        if show_means and values.size:
            ax.axvline(values.mean(), ymax=0.8, color=color, linestyle="--", linewidth=1.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # headroom for the legend
    ax.legend(frameon=False, fontsize=8.5, loc="upper left")


def plot_mean_by_position(ax, groups: Mapping[str, Sequence[Sequence[float]]], ylabel: str,
                          min_count: int = 3, xlabel: str = "response token position t") -> None:
    """Mean ± one standard error across sequences of a per-token quantity, by position.

    ``groups`` maps a name to a list of per-sequence value lists (position 0 = first response
    token). Positions with fewer than ``min_count`` sequences are left out (noisy tails).
    """
    for index, (name, sequences) in enumerate(groups.items()):
        length = max((len(s) for s in sequences), default=0)
        xs, means, errs = [], [], []
        for t in range(length):
            column = np.array([s[t] for s in sequences if len(s) > t], dtype=float)
            if column.size < min_count:
                continue
            xs.append(t)
            means.append(column.mean())
            errs.append(column.std(ddof=1) / np.sqrt(column.size) if column.size > 1 else 0.0)
        if not xs:
            continue
        xs, means, errs = np.array(xs), np.array(means), np.array(errs)
        color = group_color(name, index)
        ax.plot(xs, means, marker="o", markersize=3, color=color, label=name)
        ax.fill_between(xs, means - errs, means + errs, color=color, alpha=0.2, linewidth=0)
    ax.axhline(0.0, color="0.6", linewidth=0.8, zorder=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(frameon=False, fontsize=9)


def plot_token_heatmap(fig, ax, rows: Sequence[Mapping], colorbar_label: str, max_tokens: int = 32,
                       cmap: str = "RdBu", fontsize: float = 8.0) -> None:
    """One row per sequence, one cell per token, coloured by a per-token value.

    Each row is a mapping with ``label`` (row label), ``tokens`` (strings shown in the cells),
    ``values`` (floats, same length) and optionally ``mark`` (index of a cell to outline,
    e.g. the first wrong token) and ``separator`` (True: draw a line above this row). The
    colour scale is diverging and centred at 0 (symmetric), so red/blue read as the sign.
    Rows longer than ``max_tokens`` are cut.
    """
    n_rows = len(rows)
    n_cols = max(1, min(max_tokens, max((len(r["tokens"]) for r in rows), default=1)))
    grid = np.full((n_rows, n_cols), np.nan)
    for i, row in enumerate(rows):
        values = np.asarray(row["values"], dtype=float)[:n_cols]
        grid[i, : values.size] = values
    finite = np.abs(grid[np.isfinite(grid)])
    bound = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="0.94")  # light grey beyond a row's end
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=colormap, norm=norm, aspect="auto",
                      interpolation="nearest")
    for i, row in enumerate(rows):
        for j, token in enumerate(list(row["tokens"])[:n_cols]):
            value = grid[i, j]
            dark = np.isfinite(value) and abs(value) > 0.6 * bound
            ax.text(j, i, shorten(token, 8), ha="center", va="center", fontsize=fontsize,
                    color="white" if dark else "black")
        mark = row.get("mark")
        if mark is not None and 0 <= mark < n_cols:
            ax.add_patch(Rectangle((mark - 0.45, i - 0.45), 0.9, 0.9, fill=False, edgecolor="black",
                                   linewidth=2.0, zorder=3))
        if row.get("separator") and i > 0:
            ax.axhline(i - 0.5, color="black", linewidth=1.2)
    ax.set_yticks(range(n_rows), [row["label"] for row in rows], fontsize=fontsize + 1)
    ax.set_xticks(range(n_cols))
    ax.tick_params(axis="x", labelsize=fontsize)
    ax.set_xlabel("response token position t")
    ax.set_xticks(np.arange(-0.5, n_cols, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n_rows, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="minor", length=0)
    colorbar = fig.colorbar(image, ax=ax, shrink=0.9, pad=0.01)
    colorbar.set_label(colorbar_label)
