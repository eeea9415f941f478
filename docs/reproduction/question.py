"""Paired effects for REPRODUCTION.md's question: when does staying near the reference pay?

    python docs/reproduction/question.py [ROOT]        # ROOT: the folder of the grids (multirun/reproduce)

Reads the grids `make reproduce` writes under ROOT (objectives, beta, length, forgetting,
optimiser, dpo-strength) and prints one table per axis (gold reward, win rate and skills in
points, x100): each row compares an arm with a baseline run of the *same base model and seed* (ibridge.analysis.effects pairs the same way), the difference averaged over
seeds within a base, then mean ± standard error over the bases. Unlike `ibridge report`, a row
may compare different settings (8 against 2 SFT epochs) or read several folders, and it shows
the forgetting world's `retained_skill`. Rows whose runs have not finished are listed as such.
"""

from __future__ import annotations

import functools
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from ibridge.analysis.runs import load_runs, run_value

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
BASE_KEY = "model.pretrain.seed"


def arm(grid: str, objective: str, lr: float, **settings) -> tuple:
    return grid, objective, lr, tuple(sorted((k, str(v)) for k, v in settings.items()))


def _matches(run, objective, lr, settings) -> bool:
    if run.objective != objective or not math.isclose(float(run.lr), lr, rel_tol=1e-9):
        return False
    own = {k: v for k, v in run.settings.items() if k not in (BASE_KEY, "trainer.num_threads", "logger", "grid")}
    want = dict(settings)
    return all(str(own.get(k)) == v or _same_number(own.get(k), v) for k, v in want.items()) and set(own) <= set(want)


def _same_number(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    except (TypeError, ValueError):
        return False


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


def paired(root: Path, a: tuple, b: tuple, metric: str):
    """Per-base mean paired difference of `metric` (a − b) and the mean ± se over bases."""
    runs_a, runs_b = _runs(root, a), _runs(root, b)
    per_base = defaultdict(list)
    for key, run in runs_a.items():
        other = runs_b.get(key)
        if other is None:
            continue
        va, vb = run_value(run, metric), run_value(other, metric)
        if va is not None and vb is not None:
            per_base[key[0]].append(va - vb)
    units = {base: float(np.mean(diffs)) for base, diffs in sorted(per_base.items())}
    if not units:
        return None
    values = np.array(list(units.values()))
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(values.mean()), se, units


# Gold reward, win rate and the skills are fractions; the tables give their differences in points (x100).
POINTS = {"eval.dpo.gold_reward", "eval.dpo.win_rate", "eval.sft.gold_reward", "eval.sft.retained_skill",
          "eval.dpo.retained_skill", "eval.dpo.taught_skill"}


def _fmt(result, scale: float = 1.0, digits: int = 3) -> str:
    if result is None:
        return "not run"
    mean, se, units = result
    above = sum(v > 0 for v in units.values())
    se_text = "" if math.isnan(se) else f" ± {se * scale:.{digits}f}"
    return f"{mean * scale:+.{digits}f}{se_text} ({above}/{len(units)})"


def _cell(root: Path, a: tuple, b: tuple, metric: str) -> str:
    return _fmt(paired(root, a, b, metric), *((100, 1) if metric in POINTS else (1, 2)))


def _header(metric: str) -> str:
    return METRICS[metric] + (" (pts)" if metric in POINTS else "")


def print_rows(root: Path, title: str, rows: list[tuple[str, tuple, tuple]], metrics: list[str]) -> None:
    print(f"\n### {title}\n")
    print("| comparison | " + " | ".join(_header(m) for m in metrics) + " |")
    print("|---|" + "---:|" * len(metrics))
    for label, a, b in rows:
        print(f"| {label} | " + " | ".join(_cell(root, a, b, m) for m in metrics) + " |")


def means(root: Path, title: str, arms: list[tuple[str, tuple]], metrics: list[str]) -> None:
    """Per-arm means over all its runs (bases × seeds), for orientation."""
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


OBJECTIVES = ("tv", "chi2", "hellinger", "jsd", "rkl", "dft", "prior_leaning", "sft_kl", "asft")
F_DIVERGENCES = ("chi2", "hellinger", "jsd", "rkl")


def objectives_and_beta(root: Path, core: list[str]) -> None:
    """The objectives grid (each objective against plain sft, each f-divergence against tv, its
    scale-matched baseline) and the beta grid (each f-divergence against tv at the same beta)."""
    sft = arm("objectives", "sft", 1e-3)
    rows = [(f"{o} vs sft", arm("objectives", o, 1e-3), sft) for o in OBJECTIVES]
    rows += [(f"{o} vs tv", arm("objectives", o, 1e-3), arm("objectives", "tv", 1e-3)) for o in F_DIVERGENCES]
    print_rows(root, "default world: the objectives grid (lr 1e-3, 2 SFT epochs, 3 bases x 3 seeds)", rows, core)
    means(root, "default world, objectives", [("sft", sft)] + [(o, arm("objectives", o, 1e-3)) for o in OBJECTIVES],
          ["eval.base.gold_reward"] + core)
    beta = {b: {"objective.beta": b} for b in (0.01, 0.1, 1.0)}
    rows = [(f"beta {b:g}: {o} vs tv", arm("beta", o, 1e-3, **beta[b]), arm("beta", "tv", 1e-3, **beta[b]))
            for o in ("chi2", "jsd") for b in beta]
    rows += [(f"{o}: beta {hi:g} vs {lo:g}", arm("beta", o, 1e-3, **beta[hi]), arm("beta", o, 1e-3, **beta[lo]))
             for o in ("tv", "chi2", "jsd") for hi, lo in ((1.0, 0.01), (0.1, 0.01))]
    print_rows(root, "default world: beta (lr 1e-3, 2 SFT epochs, 3 bases x seed 0)", rows, core)


def main(root: Path) -> None:
    core = ["eval.dpo.gold_reward", "eval.dpo.win_rate", "eval.sft.gold_reward", "train.sft.kl_token"]
    forget = core + ["eval.sft.retained_skill", "eval.dpo.retained_skill", "eval.dpo.taught_skill"]
    objectives_and_beta(root, core)
    for grid, world, metrics in (("length", "default world", core), ("forgetting", "world=forgetting", forget)):
        w = {"world": "forgetting"} if grid == "forgetting" else {}
        sft2, sft8 = arm(grid, "sft", 1e-3, **{"sft.epochs": 2}, **w), arm(grid, "sft", 1e-3, **{"sft.epochs": 8}, **w)
        # The default world's lr 3e-4 at 2 epochs comes from the lr grid (3 seeds), against its own lr 1e-3.
        low2, high2 = ((arm(grid, "sft", 3e-4, **{"sft.epochs": 2}, **w), sft2) if grid == "forgetting"
                       else (arm("lr", "sft", 3e-4), arm("lr", "sft", 1e-3)))
        low8 = arm(grid, "sft", 3e-4, **{"sft.epochs": 8}, **w)
        jsd8 = arm(grid, "jsd", 1e-3, **{"sft.epochs": 8}, **w)
        rows = [
            ("8 vs 2 SFT epochs (sft, lr 1e-3)", sft8, sft2),
            ("lr 3e-4 vs 1e-3, 2 epochs", low2, high2),
            ("lr 3e-4 vs 1e-3, 8 epochs", low8, sft8),
            ("jsd vs sft, 8 epochs", jsd8, sft8),
        ]
        arms = [("sft 1e-3, 2 ep", sft2), ("sft 3e-4, 2 ep", low2),
                ("sft 1e-3, 8 ep", sft8), ("sft 3e-4, 8 ep", low8), ("jsd, 8 ep", jsd8)]
        if grid == "length":
            jsd2 = arm(grid, "jsd", 1e-3, **{"sft.epochs": 2})
            rows += [("jsd vs sft, 2 epochs", jsd2, sft2),
                     ("tv vs sft, 2 epochs", arm(grid, "tv", 1e-3, **{"sft.epochs": 2}), sft2)]
            arms.insert(2, ("jsd, 2 ep", jsd2))
        else:  # the drift limits beside the paper's, where drift costs something
            others = ("sft_kl", "asft")
            rows += [(f"{o} vs sft, 8 epochs", arm(grid, o, 1e-3, **{"sft.epochs": 8}, **w), sft8) for o in others]
            arms += [(f"{o}, 8 ep", arm(grid, o, 1e-3, **{"sft.epochs": 8}, **w)) for o in others]
        print_rows(root, f"{world}: SFT length, learning rate, objective", rows, metrics)
        means(root, world, arms, ["eval.base.gold_reward"] + metrics)

    # The optimiser: clipping on (the default, from the length grid), off, and plain SGD.
    on = {"sft.epochs": 2}
    off = {"sft.optimizer": "adamw", "sft.max_grad_norm": 1e9}
    sgd = {"sft.optimizer": "sgd", "sft.max_grad_norm": 1e9}
    sgd_lr = _sgd_lr(root)
    rows = [
        ("AdamW, clip 1: jsd vs sft", arm("length", "jsd", 1e-3, **on), arm("length", "sft", 1e-3, **on)),
        ("AdamW, clip 1: tv vs sft", arm("length", "tv", 1e-3, **on), arm("length", "sft", 1e-3, **on)),
        ("AdamW, clip 1: jsd vs tv", arm("length", "jsd", 1e-3, **on), arm("length", "tv", 1e-3, **on)),
        ("AdamW, no clip: jsd vs sft", arm("optimiser", "jsd", 1e-3, **off), arm("optimiser", "sft", 1e-3, **off)),
        (f"SGD {sgd_lr:g}, no clip: tv vs sft", arm("optimiser", "tv", sgd_lr, **sgd),
         arm("optimiser", "sft", sgd_lr, **sgd)),
        (f"SGD {sgd_lr:g}, no clip: jsd vs sft", arm("optimiser", "jsd", sgd_lr, **sgd),
         arm("optimiser", "sft", sgd_lr, **sgd)),
        (f"SGD {sgd_lr:g}, no clip: jsd vs tv", arm("optimiser", "jsd", sgd_lr, **sgd),
         arm("optimiser", "tv", sgd_lr, **sgd)),
        ("sft: AdamW no clip vs clip 1", arm("optimiser", "sft", 1e-3, **off), arm("length", "sft", 1e-3, **on)),
        ("jsd: AdamW no clip vs clip 1", arm("optimiser", "jsd", 1e-3, **off), arm("length", "jsd", 1e-3, **on)),
    ]
    print_rows(root, "default world: the optimiser (2 SFT epochs)", rows, core)

    # The strength of the DPO stage, in the world where drift costs something: does a weaker or a
    # stronger DPO change what the smaller SFT learning rate buys?
    fw = {"world": "forgetting"}
    rows = [(f"dpo.lr {d}: sft lr 3e-4 vs 1e-3", arm("dpo-strength", "sft", 3e-4, **{"dpo.lr": d}, **fw),
             arm("dpo-strength", "sft", 1e-3, **{"dpo.lr": d}, **fw)) for d in (1.5e-4, 1.5e-3)]
    rows.insert(1, ("dpo.lr 5e-4 (default): sft lr 3e-4 vs 1e-3",
                    arm("forgetting", "sft", 3e-4, **{"sft.epochs": 2}, **fw),
                    arm("forgetting", "sft", 1e-3, **{"sft.epochs": 2}, **fw)))
    print_rows(root, "world=forgetting: strength of the DPO stage (2 SFT epochs)", rows, forget)
    means(root, "world=forgetting, DPO strength", [
        (f"sft {lr:g}, dpo.lr {d}", arm("dpo-strength", "sft", lr, **{"dpo.lr": d}, **fw))
        for d in (1.5e-4, 1.5e-3) for lr in (1e-3, 3e-4)],
        ["eval.dpo.gold_reward", "eval.dpo.win_rate", "eval.dpo.retained_skill", "eval.dpo.kl_to_ref"])


def _sgd_lr(root: Path) -> float:
    """The SGD learning rate the optimiser grid ran at (Makefile SGD_LR)."""
    for run in _grid_runs(root / "optimiser"):
        if run.settings.get("sft.optimizer") == "sgd":
            return float(run.lr)
    return 0.3


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("multirun/reproduce"))
