"""Paired effects for REPRODUCTION.md's question: when does staying near the reference pay?

    python docs/reproduction/question.py [ROOT]        # ROOT: the folder of the grids (multirun/reproduce)

Reads the grid folders `make reproduce` writes under ROOT and prints one Markdown table per
question (gold reward, win rate and skills in points, x100). A row is a contrast between arms
run on the *same base model and seed*: usually arm − baseline, or a difference of differences
(does tv's cost against sft change without clipping?). The contrast is averaged over the seeds
of a base, and the per-base means are the replicates (ibridge.analysis.effects pairs the same
way within one sweep): mean, 95% Student-t interval on n_bases − 1 df, two-sided p-value, and
the p-value Holm-adjusted across the rows of the table, per metric
(ibridge/analysis/significance.py). The reading rule is printed first; a row is resolved when
its Holm-adjusted p is below 0.05. Unlike `ibridge report`, a row may compare different settings
or read several folders, and it shows the forgetting world's retained and taught skills.

Grids that did not run print no table (the older grids, `make reproduce-<grid>`, are read
when their folders exist); rows whose runs have not finished read "not run".
"""

from __future__ import annotations

import functools
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ibridge.analysis.runs import load_runs, run_value
from ibridge.analysis.significance import RULE, Inference, holm, is_resolved, t_inference

METRICS = {
    "eval.dpo.gold_reward": "Δ DPO gold",
    "eval.dpo.win_rate": "Δ DPO win",
    "eval.sft.gold_reward": "Δ SFT gold",
    "train.sft.kl_token": "Δ KL/token SFT",
    "eval.sft.retained_skill": "Δ SFT retained",
    "eval.dpo.retained_skill": "Δ DPO retained",
    "eval.dpo.taught_skill": "Δ DPO taught",
    "eval.dpo.kl_to_ref": "Δ DPO KL to SFT",
}
# Gold reward, win rate and the skills are fractions; the tables give their differences in points (x100).
POINTS = {"eval.dpo.gold_reward", "eval.dpo.win_rate", "eval.sft.gold_reward", "eval.sft.retained_skill",
          "eval.dpo.retained_skill", "eval.dpo.taught_skill"}
HEADLINE = "eval.dpo.gold_reward"  # the outcome whose test each table reports in full
BASE_KEY = "model.pretrain.seed"
IGNORED = (BASE_KEY, "trainer.num_threads", "logger", "grid", "debug")  # overrides that do not name an arm


def arm(grid: str, objective: str, lr: float, **settings) -> tuple:
    return grid, objective, lr, tuple(sorted((k, str(v)) for k, v in settings.items()))


def _same_number(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    except (TypeError, ValueError):
        return False


def _matches(run, objective, lr, settings) -> bool:
    if run.objective != objective or not math.isclose(float(run.lr), lr, rel_tol=1e-9):
        return False
    own = {k: v for k, v in run.settings.items() if k not in IGNORED}
    want = dict(settings)
    return all(str(own.get(k)) == v or _same_number(own.get(k), v) for k, v in want.items()) and set(own) <= set(want)


@functools.cache
def _grid_runs(folder: Path) -> tuple:
    """Every run of one grid folder, read once: each table row would otherwise re-read them all."""
    return tuple(load_runs(folder)) if folder.is_dir() else ()


def _runs(root: Path, spec: tuple) -> dict[tuple, object]:
    grid, objective, lr, settings = spec
    out = {}
    for run in _grid_runs(root / grid):
        if run.completed and _matches(run, objective, lr, settings):
            out[(run.settings.get(BASE_KEY, "null"), run.seed)] = run
    return out


# --------------------------------------------------------------------------- contrasts


@dataclass(frozen=True)
class Result:
    mean: float
    se: float  # NaN with one base
    units: dict[str, float]  # base -> mean contrast over its paired seeds
    test: Inference | None  # None with one base


def contrast(root: Path, terms: list[tuple[float, tuple]], metric: str) -> Result | None:
    """Σ coef · metric(arm) per (base, seed) where every arm ran, averaged over the seeds of a
    base; the per-base means are the replicates. None when no base has all the arms."""
    runs = [(coef, _runs(root, spec)) for coef, spec in terms]
    per_base = defaultdict(list)
    for key in set.intersection(*(set(found) for _, found in runs)):
        values = [run_value(found[key], metric) for _, found in runs]
        if all(v is not None for v in values):
            per_base[key[0]].append(sum(coef * v for (coef, _), v in zip(runs, values, strict=True)))
    units = {base: float(np.mean(diffs)) for base, diffs in sorted(per_base.items())}
    if not units:
        return None
    values = np.array(list(units.values()))
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return Result(float(values.mean()), se, units, t_inference(values))


def paired(root: Path, a: tuple, b: tuple, metric: str) -> Result | None:
    """Arm `a` minus arm `b`, paired by base and seed."""
    return contrast(root, [(1.0, a), (-1.0, b)], metric)


# --------------------------------------------------------------------------- tables


def _scale(metric: str) -> tuple[float, int]:
    return (100.0, 1) if metric in POINTS else (1.0, 2)


def _p(p: float | None) -> str:
    return "—" if p is None or math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.0e}")


def _fmt(result: Result | None, metric: str, p_holm: float | None = None, full: bool = False) -> list[str]:
    """A metric's cells: `Δ [95% CI] (k/n)`, then for the headline metric df, p, Holm p, resolved;
    for the others a ✓ when resolved."""
    if result is None:
        return ["not run"] + (["", "", "", ""] if full else [])
    scale, digits = _scale(metric)
    above = sum(v > 0 for v in result.units.values())
    text = f"{result.mean * scale:+.{digits}f}"
    if result.test is not None:
        text += f" [{result.test.ci_low * scale:+.{digits}f}, {result.test.ci_high * scale:+.{digits}f}]"
    text += f" ({above}/{len(result.units)})"
    if full:
        test = result.test
        return [text, "—" if test is None else str(test.df), _p(None if test is None else test.p), _p(p_holm),
                "yes" if is_resolved(p_holm) else "no"]
    return [text + (" ✓" if is_resolved(p_holm) else "")]


def _header(metric: str) -> str:
    return METRICS[metric] + (" (pts)" if metric in POINTS else "")


def print_rows(root: Path, title: str, rows: list[tuple[str, list[tuple[float, tuple]]]],
               metrics: list[str]) -> None:
    """One question's table: each row a contrast (``[(coef, arm), ...]``; a pair for a − b), each
    metric Holm-adjusted across the rows. Nothing when none of its runs exist."""
    results = {m: [contrast(root, terms, m) for _, terms in rows] for m in metrics}
    if all(r is None for found in results.values() for r in found):
        return
    adjusted = {m: holm([None if r is None or r.test is None or math.isnan(r.test.p) else r.test.p
                         for r in found]) for m, found in results.items()}
    print(f"\n### {title}\n")
    headline = metrics[0]
    headers = [f"{_header(headline)} [95% CI]", "df", "p", "p (Holm)", "resolved"]
    headers += [f"{_header(m)} [95% CI]" for m in metrics[1:]]
    print("| comparison | " + " | ".join(headers) + " |")
    print("|---|" + "---:|" * len(headers))
    for i, (label, _) in enumerate(rows):
        cells = _fmt(results[headline][i], headline, adjusted[headline][i], full=True)
        cells += [c for m in metrics[1:] for c in _fmt(results[m][i], m, adjusted[m][i])]
        print(f"| {label} | " + " | ".join(cells) + " |")


def pairs(rows: list[tuple[str, tuple, tuple]]) -> list[tuple[str, list[tuple[float, tuple]]]]:
    """`(label, a, b)` rows as contrasts a − b."""
    return [(label, [(1.0, a), (-1.0, b)]) for label, a, b in rows]


def means(root: Path, title: str, arms: list[tuple[str, tuple]], metrics: list[str]) -> None:
    """Per-arm means over all its runs (bases × seeds), for orientation."""
    if not any(_runs(root, spec) for _, spec in arms):
        return
    print(f"\n### {title}: means over bases (n runs)\n")
    names = [m.split(".", 1)[1] for m in metrics]
    print("| arm | n | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(metrics))
    for label, spec in arms:
        runs = list(_runs(root, spec).values())
        vals = []
        for m in metrics:
            xs = [v for v in (run_value(r, m) for r in runs) if v is not None]
            vals.append(f"{np.mean(xs):.3f}" if xs else "—")
        print(f"| {label} | {len(runs)} | " + " | ".join(vals) + " |")


# --------------------------------------------------------------------------- the questions

CORE = ["eval.dpo.gold_reward", "eval.dpo.win_rate", "eval.sft.gold_reward", "train.sft.kl_token"]
FORGET = CORE + ["eval.sft.retained_skill", "eval.dpo.retained_skill", "eval.dpo.taught_skill"]
# The drift limits and reweightings compared with plain sft where drift costs (Makefile reproduce-forgetting).
FORGETTING_ARMS = ("jsd", "chi2", "hellinger", "rkl", "sft_kl", "asft", "dft", "prior_leaning")
NO_CLIP = {"sft.max_grad_norm": 1e9}


def forgetting(root: Path) -> None:
    """world=forgetting at 8 SFT epochs, one seed per base: every remedy against plain sft."""
    fw = {"world": "forgetting", "sft.epochs": 8}
    sft = arm("forgetting", "sft", 1e-3, **fw)
    rows = [("lr 3e-4 vs 1e-3", arm("forgetting", "sft", 3e-4, **fw), sft)]
    rows += [(f"{o} vs sft", arm("forgetting", o, 1e-3, **fw), sft) for o in FORGETTING_ARMS]
    print_rows(root, "world=forgetting, 8 SFT epochs: each remedy against plain sft (lr 1e-3)", pairs(rows), FORGET)
    means(root, "world=forgetting, 8 SFT epochs", [("sft 1e-3", sft)] + [(label.split(" vs")[0], a)
                                                                         for label, a, _ in rows],
          ["eval.base.gold_reward"] + FORGET)


def default_world(root: Path) -> None:
    """The default world at 2 SFT epochs: the two remedies, and whether tv's cost comes through
    clipping (tv is sft's sequence-summed loss times beta: under AdamW only clipping sees the scale)."""
    sft = arm("default", "sft", 1e-3)
    rows = [("lr 3e-4 vs 1e-3", arm("default", "sft", 3e-4), sft), ("jsd vs sft", arm("default", "jsd", 1e-3), sft)]
    print_rows(root, "default world, 2 SFT epochs: the remedies against plain sft (lr 1e-3)", pairs(rows), CORE)
    tv, tv_off = arm("default", "tv", 1e-3), arm("default", "tv", 1e-3, **NO_CLIP)
    sft_off = arm("default", "sft", 1e-3, **NO_CLIP)
    rows = pairs([("AdamW, clip 1: tv vs sft", tv, sft), ("AdamW, no clip: tv vs sft", tv_off, sft_off),
                  ("sft: no clip vs clip 1", sft_off, sft), ("tv: no clip vs clip 1", tv_off, tv)])
    rows.append(("tv's cost with clipping minus without", [(1.0, tv), (-1.0, sft), (-1.0, tv_off), (1.0, sft_off)]))
    print_rows(root, "default world, 2 SFT epochs: does tv's cost come through clipping?", rows, CORE)
    means(root, "default world, 2 SFT epochs", [
        ("sft 1e-3", sft), ("sft 3e-4", arm("default", "sft", 3e-4)), ("jsd", arm("default", "jsd", 1e-3)),
        ("tv", tv), ("sft, no clip", sft_off), ("tv, no clip", tv_off)], ["eval.base.gold_reward"] + CORE)


# --------------------------------------------------------------------------- the older grids
# `make reproduce-<grid>` still runs them (3 bases); `make reproduce` no longer does. Their tables
# print when their folders exist under ROOT.

OBJECTIVES = ("tv", "chi2", "hellinger", "jsd", "rkl", "dft", "prior_leaning", "sft_kl", "asft")
F_DIVERGENCES = ("chi2", "hellinger", "jsd", "rkl")


def objectives_and_beta(root: Path) -> None:
    """The objectives grid (each objective against plain sft, each f-divergence against tv, its
    scale-matched baseline) and the beta grid (each f-divergence against tv at the same beta)."""
    sft, tv = arm("objectives", "sft", 1e-3), arm("objectives", "tv", 1e-3)
    rows = [(f"{o} vs sft", arm("objectives", o, 1e-3), sft) for o in OBJECTIVES]
    rows += [(f"{o} vs tv", arm("objectives", o, 1e-3), tv) for o in F_DIVERGENCES]
    print_rows(root, "default world: the objectives grid (lr 1e-3, 2 SFT epochs)", pairs(rows), CORE)
    beta = {b: {"objective.beta": b} for b in (0.01, 0.1, 1.0)}
    rows = [(f"beta {b:g}: {o} vs tv", arm("beta", o, 1e-3, **beta[b]), arm("beta", "tv", 1e-3, **beta[b]))
            for o in ("chi2", "jsd") for b in beta]
    rows += [(f"{o}: beta {hi:g} vs {lo:g}", arm("beta", o, 1e-3, **beta[hi]), arm("beta", o, 1e-3, **beta[lo]))
             for o in ("tv", "chi2", "jsd") for hi, lo in ((1.0, 0.01), (0.1, 0.01))]
    print_rows(root, "default world: beta (lr 1e-3, 2 SFT epochs)", pairs(rows), CORE)


def length_optimiser_dpo_strength(root: Path) -> None:
    """SFT length in the default world, the SGD control and the strength of the DPO stage."""
    on, two, eight = {"sft.epochs": 2}, {"sft.epochs": 2}, {"sft.epochs": 8}
    sft2, sft8 = arm("length", "sft", 1e-3, **two), arm("length", "sft", 1e-3, **eight)
    rows = [("8 vs 2 SFT epochs (sft, lr 1e-3)", sft8, sft2),
            ("lr 3e-4 vs 1e-3, 8 epochs", arm("length", "sft", 3e-4, **eight), sft8),
            ("jsd vs sft, 8 epochs", arm("length", "jsd", 1e-3, **eight), sft8),
            ("jsd vs sft, 2 epochs", arm("length", "jsd", 1e-3, **two), sft2),
            ("tv vs sft, 2 epochs", arm("length", "tv", 1e-3, **two), sft2)]
    print_rows(root, "default world: SFT length (older grid)", pairs(rows), CORE)
    sgd = {"sft.optimizer": "sgd", "sft.max_grad_norm": 1e9}
    off = {"sft.optimizer": "adamw", "sft.max_grad_norm": 1e9}
    lr = _sgd_lr(root)
    rows = [("AdamW, no clip: jsd vs sft", arm("optimiser", "jsd", 1e-3, **off), arm("optimiser", "sft", 1e-3, **off)),
            (f"SGD {lr:g}: tv vs sft", arm("optimiser", "tv", lr, **sgd), arm("optimiser", "sft", lr, **sgd)),
            (f"SGD {lr:g}: jsd vs sft", arm("optimiser", "jsd", lr, **sgd), arm("optimiser", "sft", lr, **sgd)),
            (f"SGD {lr:g}: jsd vs tv", arm("optimiser", "jsd", lr, **sgd), arm("optimiser", "tv", lr, **sgd)),
            ("sft: AdamW no clip vs clip 1", arm("optimiser", "sft", 1e-3, **off), arm("length", "sft", 1e-3, **on)),
            ("jsd: AdamW no clip vs clip 1", arm("optimiser", "jsd", 1e-3, **off), arm("length", "jsd", 1e-3, **on))]
    print_rows(root, "default world: the optimiser (older grid, 2 SFT epochs)", pairs(rows), CORE)
    fw = {"world": "forgetting"}
    rows = [(f"dpo.lr {d}: sft lr 3e-4 vs 1e-3", arm("dpo-strength", "sft", 3e-4, **{"dpo.lr": d}, **fw),
             arm("dpo-strength", "sft", 1e-3, **{"dpo.lr": d}, **fw)) for d in (1.5e-4, 1.5e-3)]
    print_rows(root, "world=forgetting: strength of the DPO stage (older grid, 2 SFT epochs)", pairs(rows), FORGET)


def _sgd_lr(root: Path) -> float:
    """The SGD learning rate the optimiser grid ran at (Makefile SGD_LR)."""
    for run in _grid_runs(root / "optimiser"):
        if run.settings.get("sft.optimizer") == "sgd":
            return float(run.lr)
    return 0.3


def main(root: Path) -> None:
    print(RULE)
    forgetting(root)
    default_world(root)
    objectives_and_beta(root)
    length_optimiser_dpo_strength(root)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("multirun/reproduce"))
