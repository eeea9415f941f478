"""The `forgetting` world: demonstrations withhold tasks the base model knows (REPRODUCTION.md).

`WorldConfig.demo_tasks` chooses the demonstrated tasks; the others are base-only skills,
scored on their own as `retained_skill` (gold reward on their evaluation prompts). These tests
check that only the demonstrations change (so the base models are the default world's), that a
bad value is a clear error, and, through a real pipeline, that `retained_skill` and
`taught_skill` are the gold rewards of the right prompts in generations.jsonl.
"""

from __future__ import annotations

import json

import pytest

from ibridge.world import WorldConfig, build_world, eval_slices, parse_prompt
from tests.conftest import ibridge

WITHHELD = dict(demo_tasks=("sort", "reverse", "max", "min"))
SMALL = dict(n_demonstrations=200, n_preference_prompts=200, n_heldout_pairs=30, n_eval=60, n_corpus=500)


def test_demonstrations_cover_only_demo_tasks_and_nothing_else_changes():
    default, withheld = build_world(WorldConfig(**SMALL)), build_world(WorldConfig(**SMALL, **WITHHELD))
    tasks = {parse_prompt(d["prompt"])[0] for d in withheld.demonstrations}
    assert tasks == set(WITHHELD["demo_tasks"])
    assert len(withheld.demonstrations) == SMALL["n_demonstrations"]
    # the base model's data and everything it is judged on stay the default world's
    assert withheld.corpus == default.corpus and withheld.eval == default.eval
    assert withheld.preferences == default.preferences and withheld.heldout_pairs == default.heldout_pairs
    assert {parse_prompt(p["prompt"])[0] for p in withheld.preferences} >= {"add1", "count"}
    # ... so the base model's cache key is the default world's: the worlds are paired by base
    assert WorldConfig(**WITHHELD).fingerprint() == WorldConfig().fingerprint()
    assert WorldConfig(**WITHHELD).base_only_tasks == ("add1", "count")
    # the default world draws its demonstrations exactly as before the option existed
    assert build_world(WorldConfig(**SMALL, demo_tasks=WorldConfig().tasks)).demonstrations == default.demonstrations


@pytest.mark.parametrize("demo_tasks", [("sort", "fly"), ("sort", "sort")])
def test_bad_demo_tasks_is_a_clear_error(demo_tasks):
    with pytest.raises(ValueError, match=r"demo_tasks must be distinct tasks of tasks="):
        WorldConfig(demo_tasks=demo_tasks)


def test_eval_slices_by_task_word():
    config = WorldConfig(**WITHHELD)
    prompts = ["add1 1 2", "sort 3 1", "count 4 4 4", "max 0 9"]
    assert eval_slices(config, prompts) == {"retained_skill": [True, False, True, False],
                                            "taught_skill": [False, True, False, True]}
    assert eval_slices(WorldConfig(), prompts) == {}  # the default world demonstrates every task


def test_pipeline_reports_retained_skill_from_its_generations(tmp_path, model_cache):
    ibridge(["debug=smoke", "world=forgetting", "trainer.num_threads=1", "logger=none", "hydra.run.dir=run"],
            tmp_path, model_cache)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for stage in ("base", "sft", "dpo"):
        rows = [json.loads(line) for line in (tmp_path / "run" / "eval" / stage / "generations.jsonl").open()]
        kept = [r["reward"] for r in rows if r["prompt"].split()[0] in ("add1", "count")]
        taught = [r["reward"] for r in rows if r["prompt"].split()[0] not in ("add1", "count")]
        assert kept and taught
        metrics = results["eval_by_stage"][stage]
        assert metrics["retained_skill"] == pytest.approx(sum(kept) / len(kept), abs=1e-12)
        assert metrics["taught_skill"] == pytest.approx(sum(taught) / len(taught), abs=1e-12)
        # the overall gold reward is their prompt-weighted mean: no prompt lost or counted twice
        assert metrics["gold_reward"] == pytest.approx((sum(kept) + sum(taught)) / len(rows), abs=1e-12)
