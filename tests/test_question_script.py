"""docs/reproduction/question.py: the paired effects REPRODUCTION.md's question tables print.

Its rows may compare runs from different grid folders and settings, so it pairs on its own
(same base model and seed, mean over seeds within a base, then mean ± se over bases), the way
ibridge.analysis.effects does within one sweep. Checked here against hand-computed values.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def question():
    spec = importlib.util.spec_from_file_location("question", ROOT / "docs" / "reproduction" / "question.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["question"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(folder: Path, num: int, overrides: list[str], objective: str, lr: float, gold: float) -> None:
    run = folder / f"{num}_{','.join(overrides)}"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({
        "status": "completed", "job": "pipeline", "overrides": overrides,
        "stages": {"sft": {"objective": objective, "lr": lr}},
        "eval_by_stage": {"dpo": {"gold_reward": gold}},
    }))


# Post-DPO gold by (grid folder, objective, lr, base, seed).
GOLD = {
    ("objectives", "sft", 1e-3, "null", 0): 0.70, ("objectives", "sft", 1e-3, "null", 1): 0.60,
    ("objectives", "jsd", 1e-3, "null", 0): 0.66, ("objectives", "jsd", 1e-3, "null", 1): 0.62,  # base null: -0.01
    ("objectives", "sft", 1e-3, "1", 0): 0.50, ("objectives", "sft", 1e-3, "1", 1): 0.50,
    ("objectives", "jsd", 1e-3, "1", 0): 0.55, ("objectives", "jsd", 1e-3, "1", 1): 0.53,  # base 1: +0.04
    ("lr", "sft", 1e-3, "null", 0): 0.70, ("lr", "sft", 3e-4, "null", 0): 0.73,  # +0.03
    ("lr", "sft", 1e-3, "1", 0): 0.50, ("lr", "sft", 3e-4, "1", 0): 0.49,  # -0.01
}


@pytest.fixture
def grids(tmp_path) -> Path:
    for num, ((grid, objective, lr, base, seed), gold) in enumerate(GOLD.items()):
        overrides = [f"grid={grid}", f"objective={objective}", f"lr={lr:g}", f"seed={seed}",
                     f"model.pretrain.seed={base}", "trainer.num_threads=1", "logger=none"]
        _run(tmp_path / grid, num, overrides, objective, lr, gold)
    # A run in another setting must not join the pairs: it differs in sft.epochs.
    _run(tmp_path / "objectives", 99, ["grid=objectives", "objective=jsd", "lr=0.001", "seed=0",
                                       "model.pretrain.seed=null", "sft.epochs=8"], "jsd", 1e-3, 0.0)
    return tmp_path


def test_pairs_by_base_and_seed_then_averages_over_bases(question, grids):
    result = question.paired(grids, question.arm("objectives", "jsd", 1e-3),
                             question.arm("objectives", "sft", 1e-3), "eval.dpo.gold_reward")
    assert result.units == pytest.approx({"null": -0.01, "1": 0.04})
    assert result.mean == pytest.approx(0.015)
    assert result.se == pytest.approx(0.025)  # std([-0.01, 0.04], ddof=1) / sqrt(2)
    # 2 bases: 1 df, t(0.975, 1) = 12.7062 (tables): 0.015 ± 12.7062 x 0.025
    assert result.test.df == 1
    assert result.test.ci_low == pytest.approx(0.015 - 12.7062 * 0.025, abs=1e-5)
    assert result.test.ci_high == pytest.approx(0.015 + 12.7062 * 0.025, abs=1e-5)
    # In points, with the interval and the bases above 0; p and Holm in the headline columns.
    cells = question._fmt(result, "eval.dpo.gold_reward", p_holm=0.9, full=True)
    assert cells[0] == "+1.5 [-30.3, +33.3] (1/2)"
    assert cells[1:] == ["1", f"{result.test.p:.3f}", "0.900", "no"]


def test_rows_read_their_own_folder_and_settings(question, grids):
    result = question.paired(grids, question.arm("lr", "sft", 3e-4), question.arm("lr", "sft", 1e-3),
                             "eval.dpo.gold_reward")
    assert result.units == pytest.approx({"null": 0.03, "1": -0.01}) and result.mean == pytest.approx(0.01)
    eight = question.arm("objectives", "jsd", 1e-3, **{"sft.epochs": 8})
    (only,) = question._runs(grids, eight).values()  # the 2-epoch jsd runs are another arm
    assert math.isclose(only.lr, 1e-3) and only.settings["sft.epochs"] == "8"
    # A row may compare settings on purpose (8 vs 2 epochs): it pairs base null, seed 0 only.
    result = question.paired(grids, eight, question.arm("objectives", "sft", 1e-3), "eval.dpo.gold_reward")
    assert result.units == pytest.approx({"null": -0.70}) and math.isnan(result.se) and result.test is None
    assert question.paired(grids, question.arm("beta", "jsd", 1e-3), question.arm("beta", "tv", 1e-3),
                           "eval.dpo.gold_reward") is None  # a grid that did not run: "not run"


def test_a_difference_of_differences_pairs_four_arms_by_base_and_seed(question, grids):
    jsd, sft = question.arm("objectives", "jsd", 1e-3), question.arm("objectives", "sft", 1e-3)
    low, high = question.arm("lr", "sft", 3e-4), question.arm("lr", "sft", 1e-3)
    result = question.contrast(grids, [(1.0, jsd), (-1.0, sft), (-1.0, low), (1.0, high)], "eval.dpo.gold_reward")
    # seed 0 only (the lr grid ran seed 0): base null (0.66 - 0.70) - (0.73 - 0.70) = -0.07;
    # base 1 (0.55 - 0.50) - (0.49 - 0.50) = +0.06
    assert result.units == pytest.approx({"null": -0.07, "1": 0.06})


def test_holm_runs_across_the_rows_of_a_table(question, grids, capsys):
    rows = question.pairs([("jsd vs sft", question.arm("objectives", "jsd", 1e-3), question.arm("objectives", "sft", 1e-3)),
                           ("lr", question.arm("lr", "sft", 3e-4), question.arm("lr", "sft", 1e-3))])
    question.print_rows(grids, "t", rows, ["eval.dpo.gold_reward"])
    printed = capsys.readouterr().out
    p = [question.paired(grids, *[a for _, a in terms], "eval.dpo.gold_reward").test.p for _, terms in rows]
    low, high = sorted(p)
    expected = {min(p): min(1, 2 * low), max(p): max(min(1, 2 * low), high)}  # Holm by hand, two rows
    for value in p:
        assert f"| {value:.3f} | {expected[value]:.3f} | no |" in printed
