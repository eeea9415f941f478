"""Paired differences against the baseline cell, hand-computed on a synthetic sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ibridge.analysis.effects import paired_effects
from ibridge.analysis.report import write_report
from ibridge.analysis.runs import load_runs
from ibridge.analysis.tables import effects_markdown

# post-DPO win rate by (base, objective, lr, seed). Base 1: the smaller lr wins by
# +0.02 and +0.04 (mean +0.03); base 2: it loses by 0.01 and 0.03 (mean -0.02).
WIN = {
    (1, "sft", 1e-3, 0): 0.50, (1, "sft", 1e-3, 1): 0.40, (1, "sft", 1e-4, 0): 0.52, (1, "sft", 1e-4, 1): 0.44,
    (2, "sft", 1e-3, 0): 0.60, (2, "sft", 1e-3, 1): 0.30, (2, "sft", 1e-4, 0): 0.59, (2, "sft", 1e-4, 1): 0.27,
    (1, "jsd", 1e-3, 0): 0.45, (1, "jsd", 1e-3, 1): 0.45, (2, "jsd", 1e-3, 0): 0.60,  # (2, jsd, seed 1) failed
}


def _sweep(root: Path) -> Path:
    for num, ((base, objective, lr, seed), win) in enumerate(WIN.items()):
        overrides = [f"model.pretrain.seed={base}", f"objective={objective}", f"lr={lr:g}", f"seed={seed}"]
        folder = root / f"{num}_{'+'.join(o.replace('=', '-', 1) for o in overrides)}"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({
            "status": "completed", "job": "pipeline", "overrides": overrides,
            "stages": {"sft": {"objective": objective, "lr": lr}},
            "eval_by_stage": {"dpo": {"win_rate": win, "gold_reward": win + 0.2}},
        }))
    failed = root / "99_model.pretrain.seed-2+objective-jsd+lr-0.001+seed-1"
    failed.mkdir()
    (failed / "results.json").write_text(json.dumps({
        "status": "failed", "error": "boom", "overrides": ["model.pretrain.seed=2", "objective=jsd", "lr=0.001",
                                                           "seed=1"]}))
    return root


def test_effects_pair_by_seed_within_each_base_then_average_over_bases(tmp_path):
    effects = {(e.objective, e.lr): e for e in paired_effects(load_runs(_sweep(tmp_path)))}
    assert set(effects) == {("sft", 1e-4), ("jsd", 1e-3)}  # the baseline (sft, 1e-3) is not compared with itself
    smaller = effects[("sft", 1e-4)]
    assert smaller.per_block == pytest.approx({"model.pretrain.seed=1": 0.03, "model.pretrain.seed=2": -0.02})
    assert smaller.mean == pytest.approx(0.005)
    assert smaller.se == pytest.approx(0.025)  # std([0.03, -0.02], ddof=1) / sqrt(2)
    assert smaller.baseline_mean == pytest.approx((0.45 + 0.45) / 2)  # base 1: 0.45, base 2: 0.45
    assert smaller.units_above == 1
    # jsd: base 1 pairs both seeds (-0.05, +0.05 -> 0.0); base 2 only seed 0 (0.0): failed runs drop out.
    jsd = effects[("jsd", 1e-3)]
    assert jsd.per_block == pytest.approx({"model.pretrain.seed=1": 0.0, "model.pretrain.seed=2": 0.0})


def test_one_block_uses_the_paired_seeds_as_replicates(tmp_path):
    sweep = _sweep(tmp_path)
    runs = [run for run in load_runs(sweep) if "model.pretrain.seed=1" in run.extra]
    (effect,) = [e for e in paired_effects(runs) if e.objective == "sft"]
    assert effect.units == pytest.approx((0.02, 0.04))
    assert effect.se == pytest.approx(0.01) and effect.mean == pytest.approx(0.03)


def test_the_report_carries_the_effects(tmp_path):
    payload = write_report(_sweep(tmp_path / "sweep"), tmp_path / "out")
    effects = payload["effects"]["eval.dpo.gold_reward"]
    smaller = next(e for e in effects if e["objective"] == "sft")
    assert math.isclose(smaller["mean"], 0.005, abs_tol=1e-12)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Against the baseline" in text and "+0.005 ± 0.025" in text
    assert effects_markdown([], "nothing") == []


# Objective (and granularity) effects on the post-DPO win rate, per base model; sft has no granularity.
LIKE = {("sft", None): 0.40, ("tv", "sequence"): 0.42, ("tv", "token"): 0.47,
        ("jsd", "sequence"): 0.45, ("jsd", "token"): 0.46}
BASE_SHIFT = {1: 0.0, 2: 0.10}


def _like_for_like_sweep(root: Path) -> Path:
    num = 0
    for (objective, granularity), win in LIKE.items():
        for base in BASE_SHIFT:
            for seed in (0, 1):
                overrides = [f"model.pretrain.seed={base}", f"objective={objective}", "lr=0.001", f"seed={seed}"]
                if granularity:
                    overrides.append(f"objective.granularity={granularity}")
                value = win + BASE_SHIFT[base] + 0.01 * seed
                value += 0.02 if (objective, granularity, base) == ("jsd", "token", 2) else 0.0
                folder = root / str(num)
                folder.mkdir(parents=True)
                (folder / "results.json").write_text(json.dumps({
                    "status": "completed", "job": "pipeline", "overrides": overrides,
                    "stages": {"sft": {"objective": objective, "lr": 1e-3}},
                    "eval_by_stage": {"dpo": {"win_rate": value, "gold_reward": value}},
                }))
                num += 1
    return root


def test_tv_baseline_is_tv_at_the_same_lr_and_granularity(tmp_path):
    runs = load_runs(_like_for_like_sweep(tmp_path))
    vs_tv = {e.settings: e for e in paired_effects(runs, baseline="tv")}
    assert {e.objective for e in vs_tv.values()} == {"jsd"}  # neither sft nor tv is compared with tv
    sequence = vs_tv[("objective.granularity=sequence",)]
    assert sequence.per_block == pytest.approx({"model.pretrain.seed=1": 0.03, "model.pretrain.seed=2": 0.03})
    token = vs_tv[("objective.granularity=token",)]  # 0.46 - 0.47, and +0.02 more on base 2
    assert token.per_block == pytest.approx({"model.pretrain.seed=1": -0.01, "model.pretrain.seed=2": 0.01})
    assert token.mean == pytest.approx(0.0, abs=1e-12) and token.se == pytest.approx(0.01)
    assert token.baseline_mean == pytest.approx(((0.47 + 0.005) + (0.57 + 0.005)) / 2)
    # Against plain sft, which has no granularity: every tv and jsd cell, each by its own granularity.
    vs_sft = {(e.objective, e.settings): e.mean for e in paired_effects(runs, baseline="sft")}
    assert vs_sft == pytest.approx({
        ("tv", ("objective.granularity=sequence",)): 0.02, ("tv", ("objective.granularity=token",)): 0.07,
        ("jsd", ("objective.granularity=sequence",)): 0.05, ("jsd", ("objective.granularity=token",)): 0.07,
    })
    with pytest.raises(ValueError, match="baseline='kl'"):
        paired_effects(runs, baseline="kl")
