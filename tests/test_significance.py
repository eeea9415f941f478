"""Intervals, p-values, Holm and "resolved" for paired effects (ibridge/analysis/significance.py).

Hand-computed cases, then the properties that matter on simulated sweeps with a known effect:
the 95% interval covers the true effect 95% of the time when the base model is a random draw
(a z-interval, or one over seeds pooled across bases, does not), and Holm keeps the chance of
any false "resolved" in a question at 5% or less.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from ibridge.analysis.effects import paired_effects
from ibridge.analysis.report import write_report
from ibridge.analysis.runs import Run
from ibridge.analysis.significance import RULE, holm, is_resolved, t_inference


def test_t_interval_and_p_by_hand():
    # units 1, 2, 3: mean 2, sd 1, se 1/sqrt(3); t(0.975, df 2) = 4.302653 (tables); t = 2 sqrt(3) = 3.4641,
    # two-sided p with 2 df = 1 - t / sqrt(t^2 + 2) = 0.074180 (the t_2 CDF in closed form).
    result = t_inference([1.0, 2.0, 3.0])
    half = 4.302653 / math.sqrt(3)
    assert (result.n, result.df, result.mean) == (3, 2, 2.0)
    assert result.ci_low == pytest.approx(2 - half, abs=1e-6) and result.ci_high == pytest.approx(2 + half, abs=1e-6)
    t = 2 * math.sqrt(3)
    assert result.p == pytest.approx(1 - t / math.sqrt(t * t + 2), abs=1e-9)


def test_one_unit_has_no_interval_and_no_spread_has_no_p_value():
    assert t_inference([0.3]) is None
    flat = t_inference([0.2, 0.2, 0.2])
    assert flat.ci_low == flat.ci_high == pytest.approx(0.2) and math.isnan(flat.p)
    assert not is_resolved(flat.p)


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> x3, x2, x1 = 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, None, 0.01]) == [pytest.approx(0.5), None, pytest.approx(0.02)]  # None is no test
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # 0.8 x 2 = 1.6 is capped at 1; the running max carries it


def test_resolved_is_the_holm_adjusted_p_below_five_percent():
    assert is_resolved(0.049) and not is_resolved(0.05) and not is_resolved(None) and not is_resolved(math.nan)


# --------------------------------------------------------------------------- simulated sweeps


@pytest.fixture(autouse=True)
def _no_forced_collection(monkeypatch):
    """statsmodels' Holm branch calls gc.collect() on every call (0.1-0.2 s on a loaded machine);
    the simulations below make over a thousand calls. Collection changes no value."""
    import gc

    monkeypatch.setattr(gc, "collect", lambda *args: 0)


def _run(base: int, objective: str, seed: int, value: float) -> Run:
    return Run(Path(f"/sim/{base}/{objective}/{seed}"), "completed", None, objective, 1e-3, seed,
               {"model.pretrain.seed": str(base)}, results={"eval_by_stage": {"dpo": {"win_rate": value}}})


def _simulated_runs(rng, effects: dict[str, float], bases: int, seeds: int,
                    base_sd: float = 0.03, seed_sd: float = 0.01) -> list[Run]:
    """A sweep where arm `o` beats sft by effects[o] on average; each base shifts each arm's effect
    by its own draw (sd `base_sd`: the base is a random draw) and each run adds seed noise."""
    runs = []
    for base in range(bases):
        level = rng.normal(0.4, 0.05)
        shift = {o: rng.normal(0.0, base_sd) for o in effects}
        for seed in range(seeds):
            runs.append(_run(base, "sft", seed, level + rng.normal(0, seed_sd)))
            runs += [_run(base, o, seed, level + effect + shift[o] + rng.normal(0, seed_sd))
                     for o, effect in effects.items()]
    return runs


@pytest.mark.parametrize("bases,seeds", [(3, 2), (5, 1)])
def test_the_interval_covers_a_known_effect_95_percent_of_the_time(bases, seeds):
    rng = np.random.default_rng(20260101)
    trials, covered = 600, 0
    for _ in range(trials):
        (effect,) = paired_effects(_simulated_runs(rng, {"jsd": 0.02}, bases, seeds))
        assert effect.df == bases - 1  # the bases are the replicates, not the seeds
        covered += effect.ci_low <= 0.02 <= effect.ci_high
    # Binomial sd at 95% over 600 trials is 0.9 points: 0.92-0.98 is over 3 sd. A normal
    # quantile (1.96) on 2 df covers ~81%, seeds pooled across bases far less.
    assert 0.92 <= covered / trials <= 0.98, covered / trials


def test_holm_keeps_false_resolutions_within_five_percent_in_a_question_of_null_rows():
    rng = np.random.default_rng(7)
    arms = {f"arm{i}": 0.0 for i in range(6)}
    trials, any_false, any_false_raw = 400, 0, 0
    for _ in range(trials):
        found = paired_effects(_simulated_runs(rng, arms, bases=4, seeds=1))
        any_false += any(e.resolved for e in found)
        any_false_raw += any(e.p < 0.05 for e in found)
    assert any_false / trials <= 0.07, any_false / trials  # at most 5% in expectation (+ 2 binomial sd)
    assert any_false_raw / trials > 0.15  # without the correction, six null rows "find" something often


def test_a_large_effect_on_enough_bases_is_resolved_and_a_small_one_is_not():
    rng = np.random.default_rng(3)
    found = {e.objective: e for e in paired_effects(_simulated_runs(rng, {"big": 0.10, "none": 0.0}, 8, 1))}
    assert found["big"].resolved and found["big"].p_holm < 0.05 and found["big"].ci_low > 0
    assert not found["none"].resolved


# --------------------------------------------------------------------------- in the report


def _write_sweep(root: Path, runs: list[Run]) -> Path:
    for num, run in enumerate(runs):
        overrides = [f"model.pretrain.seed={run.settings['model.pretrain.seed']}", f"objective={run.objective}",
                     "lr=0.001", f"seed={run.seed}"]
        folder = root / f"{num}_{','.join(overrides)}"
        folder.mkdir(parents=True)
        value = run.results["eval_by_stage"]["dpo"]["win_rate"]
        (folder / "results.json").write_text(json.dumps({
            "status": "completed", "job": "pipeline", "overrides": overrides,
            "stages": {"sft": {"objective": run.objective, "lr": 1e-3}},
            "eval_by_stage": {"dpo": {"win_rate": value, "gold_reward": value}}}))
    return root


def test_the_report_prints_and_writes_intervals_p_values_and_resolved(tmp_path):
    runs = _simulated_runs(np.random.default_rng(5), {"jsd": 0.10, "chi2": 0.0}, bases=6, seeds=1)
    console = Console(record=True, width=200)
    payload = write_report(_write_sweep(tmp_path / "sweep", runs), tmp_path / "out", console=console)
    printed = console.export_text()
    assert "Reading rule" in printed and "p (Holm)" in printed and "95% CI" in printed and "resolved" in printed
    effects = {e["objective"]: e for e in payload["effects"]["eval.dpo.win_rate"]}
    jsd = effects["jsd"]
    assert jsd["df"] == 5 and jsd["resolved"] is True and jsd["ci95"][0] <= jsd["mean"] <= jsd["ci95"][1]
    direct = t_inference(jsd["units"])
    assert jsd["p"] == pytest.approx(direct.p) and jsd["ci95"] == pytest.approx([direct.ci_low, direct.ci_high])
    assert jsd["p_holm"] == pytest.approx(min(1.0, 2 * direct.p))  # the smallest of two p-values, doubled
    assert effects["chi2"]["resolved"] is False
    text = (tmp_path / "out" / "report.md").read_text()
    assert RULE in text
    assert text.index(RULE) < text.index("| 95% CI")  # stated once, before the first effects table
    assert text.count("Reading rule") == 1
