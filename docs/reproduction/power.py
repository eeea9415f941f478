"""How many toy base models each headline comparison needs to resolve a 2-point effect.

    python docs/reproduction/power.py [REPORTS]     # REPORTS: the grid reports (docs/reproduction)

Inputs: the grid reports of the last `make reproduce` (``<grid>/report.md``): for each headline
comparison, its per-base paired effects on post-DPO gold (the "Post-DPO gold reward" table
against plain sft) and, from the cell table, each arm's standard error over the seeds of a base.

Method (docs/design.md §3; the statistics are those of ibridge/analysis/significance.py):

1. A comparison's per-base effect, measured with ``m`` seeds per base, varies between bases with
   variance ``s_m^2 = s_b^2 + s_w^2 / m`` (``s_b``: the base-to-base spread of the true effect;
   ``s_w``: one seed's noise in a paired difference). ``s_w^2`` is estimated as
   ``m (se_arm^2 + se_baseline^2)`` from the cell table, averaged over the bases: the reports keep
   no per-seed pairs, so this treats the two arms of one seed as independent. Pairing by seed
   makes the true ``s_w`` smaller, and the observed spread bounds it: ``s_w^2 <= m s_m^2``
   (``s_b^2 >= 0``). The estimate is capped there; in most rows the cap binds (the arms of one
   seed are strongly correlated), so the plan takes all of the spread between bases for seed noise
   that one seed would see in full: the most pessimistic reading the data allow.
2. The plan runs one seed per base (a seed costs what a base costs, and only a new base shrinks
   ``s_b``), so the per-base sd to plan with is ``s_1 = sqrt(s_m^2 + s_w^2 (1 - 1/m))``.
3. Each ``s_1`` rests on 3 bases (2 df), too few to plan with one by one. The rows of one question
   are pooled (their variances averaged: 2 df each), and the plan uses that pooled sd for every
   row of the question; the per-row figure is shown beside it.
4. ``n`` is the smallest number of bases at which a two-sided one-sample t-test (n - 1 df) has
   80% power against a true effect of 2 points at level 0.05 / k, where k is the number of rows
   of the question: Bonferroni's level, the one Holm applies to the row with the smallest p, so
   the power of every row under Holm is at least this (``statsmodels`` TTestPower).

Comparisons that the last run did not make in the forgetting world (chi2, hellinger, rkl, dft,
prior_leaning) borrow their spread from the default world's objectives grid: an assumption,
marked in the output.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EFFECT_POINTS = 2.0  # the effect to resolve, in points of post-DPO gold (x100)
POWER = 0.8
ALPHA = 0.05
BASE_COLUMN = "model.pretrain.seed"


@dataclass(frozen=True)
class Comparison:
    question: str
    label: str
    grid: str  # the report folder its data come from
    objective: str
    lr: str  # as the report writes it
    settings: tuple[tuple[str, str], ...] = ()  # other columns of the row, e.g. sft.epochs=8
    proxy: str = ""  # why the data come from another setting, if they do


F8 = (("sft.epochs", "8"),)
FORGETTING = "world=forgetting, 8 SFT epochs, vs sft lr 1e-3"
DEFAULT = "default world, 2 SFT epochs, vs sft lr 1e-3"
_PROXY = "not run in the forgetting world: spread of the default world's objectives grid"
HEADLINE = [
    Comparison(FORGETTING, "lr 3e-4", "forgetting", "sft", "0.0003", F8),
    Comparison(FORGETTING, "jsd", "forgetting", "jsd", "0.001", F8),
    Comparison(FORGETTING, "sft_kl", "forgetting", "sft_kl", "0.001", F8),
    Comparison(FORGETTING, "asft", "forgetting", "asft", "0.001", F8),
    *(Comparison(FORGETTING, name, "objectives", name, "0.001", (), _PROXY)
      for name in ("chi2", "hellinger", "rkl", "dft", "prior_leaning")),
    Comparison(DEFAULT, "lr 3e-4", "lr", "sft", "0.0003"),
    Comparison(DEFAULT, "jsd", "objectives", "jsd", "0.001"),
]


# --------------------------------------------------------------------------- reading report.md


def _tables(text: str) -> list[tuple[str, list[dict[str, str]]]]:
    """Every Markdown table with the heading above it: (heading, rows as header -> cell)."""
    out, heading, lines = [], "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = [h.strip() for h in line.strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(header, (c.strip() for c in lines[i].strip("|").split("|")), strict=False)))
                i += 1
            out.append((heading, rows))
            continue
        i += 1
    return out


def _matches(row: dict[str, str], objective: str, lr: str, settings) -> bool:
    return row.get("objective") == objective and row.get("SFT lr") == lr and all(
        row.get(key, value) == value for key, value in settings)


def per_base_effects(report: str, comparison: Comparison) -> dict[str, float]:
    """The comparison's per-base post-DPO gold effect (a fraction) from the report's table against sft."""
    for heading, rows in _tables(report):
        if heading != "Post-DPO gold reward" or not rows or f"{BASE_COLUMN}=1" not in rows[0]:
            continue
        for row in rows:
            if _matches(row, comparison.objective, comparison.lr, comparison.settings):
                return {key.split("=", 1)[1]: float(value) for key, value in row.items()
                        if key.startswith(BASE_COLUMN + "=") and value not in ("", "—")}
        break  # the first such table is the one against plain sft
    raise LookupError(f"{comparison.grid}/report.md: no post-DPO gold row for {comparison.label}")


_STAT = re.compile(r"^(-?[\d.]+)(?: ± ([\d.]+))?")


def seed_variance(report: str, comparison: Comparison) -> tuple[float, int]:
    """``(s_w^2, m)``: one seed's variance of the paired difference, m (se_arm^2 + se_base^2)
    averaged over the bases, and the seeds per base."""
    cells = _tables(report)[0][1]
    baseline = ("sft", "0.001", comparison.settings)
    values, seeds = [], set()
    for base in sorted({row[BASE_COLUMN] for row in cells}):
        ses = []
        for objective, lr, settings in ((comparison.objective, comparison.lr, comparison.settings), baseline):
            row = next(r for r in cells if r[BASE_COLUMN] == base and _matches(r, objective, lr, settings))
            match = _STAT.match(row["DPO gold"])
            ses.append(float(match.group(2)) if match and match.group(2) else math.nan)
            seeds.add(int(row["n"]))
        m = min(seeds)
        values.append(m * (ses[0] ** 2 + ses[1] ** 2))
    return float(np.nanmean(values)), min(seeds)


# --------------------------------------------------------------------------- the plan


def bases_needed(sd_points: float, rows: int, effect: float = EFFECT_POINTS) -> int:
    """Smallest number of bases for POWER against `effect` at level ALPHA / rows (two-sided t)."""
    from statsmodels.stats.power import TTestPower

    n = TTestPower().solve_power(effect_size=effect / sd_points, alpha=ALPHA / rows, power=POWER,
                                 alternative="two-sided")
    return max(2, math.ceil(float(n)))


def detectable(sd_points: float, rows: int, bases: int) -> float:
    """The effect (points) resolved with POWER at `bases` bases and level ALPHA / rows."""
    from statsmodels.stats.power import TTestPower

    d = TTestPower().solve_power(effect_size=None, nobs=bases, alpha=ALPHA / rows, power=POWER,
                                 alternative="two-sided")
    return float(d) * sd_points


def plan(reports: Path) -> list[dict]:
    rows = []
    for comparison in HEADLINE:
        report = (reports / comparison.grid / "report.md").read_text(encoding="utf-8")
        effects = np.array(list(per_base_effects(report, comparison).values())) * 100
        s_w2, m = seed_variance(report, comparison)
        s_m2 = float(effects.var(ddof=1))
        s_w2 = min(s_w2 * 1e4, m * s_m2)  # in points^2, capped by what the spread over bases allows
        s_1 = math.sqrt(s_m2 + s_w2 * (1 - 1 / m))
        rows.append({"comparison": comparison, "effects": effects, "m": m, "s_m": math.sqrt(s_m2),
                     "s_w": math.sqrt(s_w2), "s_1": s_1})
    for question in dict.fromkeys(c.question for c in HEADLINE):
        mine = [r for r in rows if r["comparison"].question == question]
        pooled = math.sqrt(float(np.mean([r["s_1"] ** 2 for r in mine])))
        for r in mine:
            r.update(k=len(mine), pooled=pooled, n_row=bases_needed(r["s_1"], len(mine)),
                     n=bases_needed(pooled, len(mine)))
    return rows


# --------------------------------------------------------------------------- the time of `make reproduce`
# The last run (REPRODUCTION.md at commit 949c797): `make reproduce: 7 grids in 3278 s`, 270 pipelines
# (225 at 2 SFT epochs, 45 at 8), two cells at a time, bases cached, in 14 sweep commands and 7
# reports; about 225 s of it was the paired-effects script, which now takes 4 s. A cell took 17 s
# (2 epochs) and 35 s (8 epochs), medians; two at a time, a pipeline advanced the run by half that.
LAST_RUN_S, LAST_SCRIPT_S, LAST_COMMANDS = 3278, 225, 14 + 7
LAST_PIPELINES = {2: 225, 8: 45}
CELL_S = {2: 17.0, 8: 35.0}
PARALLEL = 2
BASE_BUILD_S = 26.0  # per new base, once (README: 26 s at two threads)
# `make reproduce` now: pipelines per base by SFT epochs, and its commands (Makefile).
PLAN_PER_BASE = {8: 10, 2: 6}
PLAN_COMMANDS = 5 + 2  # sweeps + reports; the paired-effects script adds 4 s


def command_overhead_s() -> float:
    """Seconds per command of the last run not explained by its pipelines (start-up, reports, the
    tail of a sweep where one of the two slots idles)."""
    pipelines = sum(n * CELL_S[ep] / PARALLEL for ep, n in LAST_PIPELINES.items())
    return (LAST_RUN_S - LAST_SCRIPT_S - pipelines) / LAST_COMMANDS


def reproduce_seconds(bases: int, cached_bases: int = 0) -> tuple[float, str]:
    """Estimated seconds of `make reproduce` at `bases` bases, and the arithmetic."""
    per_base = sum(n * CELL_S[ep] / PARALLEL for ep, n in PLAN_PER_BASE.items())
    overhead = command_overhead_s()
    total = bases * per_base + (bases - cached_bases) * BASE_BUILD_S + PLAN_COMMANDS * overhead + 4
    text = (f"{bases} bases x ({' + '.join(f'{n} x {CELL_S[ep]:g}/{PARALLEL} s' for ep, n in PLAN_PER_BASE.items())}"
            f" = {per_base:.0f} s) + {bases - cached_bases} new bases x {BASE_BUILD_S:g} s + {PLAN_COMMANDS} commands x "
            f"{overhead:.1f} s + 4 s = {total:.0f} s ({total / 60:.1f} min)")
    return total, text


def main(reports: Path, bases: list[int]) -> None:
    rows = plan(reports)
    print(f"Bases for {POWER:.0%} power against a {EFFECT_POINTS:g}-point effect on post-DPO gold, "
          f"two-sided t-test at 0.05/k (k rows per question), one seed per base.\n")
    print("| question | comparison | per-base effects (pts) | m | s_m: sd over bases (pts) | s_w: seed sd (capped) | "
          "s_1 (1 seed) | n (own s_1) | pooled s_1 | n (pooled) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        c = r["comparison"]
        note = " *" if c.proxy else ""
        effects = ", ".join(f"{v:+.1f}" for v in r["effects"])
        print(f"| {c.question} (k={r['k']}) | {c.label}{note} | {effects} | {r['m']} | {r['s_m']:.2f} | "
              f"{r['s_w']:.2f} | {r['s_1']:.2f} | {r['n_row']} | {r['pooled']:.2f} | {r['n']} |")
    print("\n\\* " + _PROXY + ".\n")
    print("Detectable effect (pts, 80% power, pooled sd) at a given number of bases:\n")
    questions = list(dict.fromkeys(r["comparison"].question for r in rows))
    print("| bases | " + " | ".join(questions) + " |")
    print("|---:|" + "---:|" * len(questions))
    for n in bases:
        cells = []
        for q in questions:
            r = next(r for r in rows if r["comparison"].question == q)
            cells.append(f"{detectable(r['pooled'], r['k'], n):.1f}")
        print(f"| {n} | " + " | ".join(cells) + " |")
    overhead = command_overhead_s()
    print(f"\nTime of `make reproduce` (Makefile REPRO_BASES), from the last run: command overhead "
          f"({LAST_RUN_S} - {LAST_SCRIPT_S} s - {LAST_PIPELINES[2]} x {CELL_S[2]:g}/{PARALLEL} s - "
          f"{LAST_PIPELINES[8]} x {CELL_S[8]:g}/{PARALLEL} s) / {LAST_COMMANDS} commands = {overhead:.1f} s.\n")
    for n in bases:
        print(f"- {reproduce_seconds(n)[1]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent, [3, 10, 12, 13, 20, 40])
