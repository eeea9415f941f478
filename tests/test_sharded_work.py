"""Rank 0's long jobs shared out across ranks (issue 14, item 3), each checked against one process.

One torchrun of tests/shard_worker.py (2 CPU ranks, gloo) runs every check; see its docstring.
"""

from __future__ import annotations

import json

import pytest

from ibridge.data import source_for
from ibridge.models import ensure_toy_base
from ibridge.runtime import Runtime
from tests.conftest import compose_config
from tests.torchrun import run_worker

pytestmark = pytest.mark.slow  # a torchrun: `make test` runs it


@pytest.fixture(scope="module")
def report(tmp_path_factory, model_cache) -> dict:
    import torch

    cfg = compose_config(["debug=smoke", f"model.cache_dir={model_cache}"])
    source = source_for(cfg.data)
    ensure_toy_base(cfg.model, source.world_config, Runtime(device=torch.device("cpu"), precision="fp32"))
    out = tmp_path_factory.mktemp("shard")
    run_worker("shard_worker.py", str(out), str(model_cache), timeout=600, tail=6000,
               env={"IBRIDGE_CACHE": str(model_cache), "WANDB_MODE": "offline"})
    return json.loads((out / "report.json").read_text())


def test_reference_pass_is_shared_out_and_equals_one_process_bitwise(report):
    ref = report["reference_pass"]
    ranks = ref["ranks"]
    assert all(r["bitwise"] for r in ranks), [r["worst"] for r in ranks]
    # Each rank scored only its share; together, every sequence once.
    assert all(0 < r["rows"] < ref["sequences"] for r in ranks)
    assert sum(r["rows"] for r in ranks) == ref["sequences"]
    assert [r["loads"] for r in ranks] == [1, 1]  # each loaded the reference once (the miss), not on the hit
    # Rank 0 alone keeps the cache; rank 1's folder stays empty, yet it got rank 0's hit.
    assert [r["files"] for r in ranks] == [1, 0]
    assert all(r["hit_equal"] for r in ranks)


def test_sharded_token_kl_equals_one_process_also_with_an_fsdp_policy(report):
    kl = report["token_kl"]
    assert kl["single"] > 1e-3  # the policy differs from its reference
    # An odd number of batches: under FSDP the rank with fewer runs a stand-in forward, so
    # both make as many (collective) forwards.
    assert kl["batches"] == 3 and [r["fsdp_forwards"] for r in kl["ranks"]] == [2, 2]
    for rank in kl["ranks"]:
        assert rank["whole"] == pytest.approx(kl["single"], rel=1e-9)
        assert rank["fsdp"] == pytest.approx(kl["single"], rel=1e-6)


def test_sharded_evaluation_equals_one_process(report):
    ev = report["evaluation"]
    single, ranks = ev["single"], ev["ranks"]
    assert ev["files_equal"] == {"generations.jsonl": True, "alpaca_eval.json": True}
    assert {"win_rate", "gold_reward", "kl_to_ref", "implicit_reward_acc"} <= single.keys()
    assert single["kl_to_ref"] > 0
    for rank in ranks:
        assert rank["metrics"].keys() == single.keys()
        for key, value in single.items():
            if isinstance(value, float):
                assert rank["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
            else:
                assert rank["metrics"][key] == value, key
    # Greedy generations and the KL samples (2 x 12 prompts), and the outputs and references
    # judged (2 x 12): each rank did part, the ranks together all of it, once.
    for count in ("generated", "judged"):
        assert ev["single_counts"][count] == 2 * ev["prompts"]
        assert all(0 < rank[count] < ev["single_counts"][count] for rank in ranks), count
        assert sum(rank[count] for rank in ranks) == ev["single_counts"][count]


def test_ddp_stage_stopped_on_one_rank_waits_for_the_state_and_resumes_exactly(report):
    for rank in report["resume"]["ranks"]:
        assert rank["published_on_exit"] is True  # rank 1 left only once rank 0's slow write was done
        assert rank["stopped_at"] == 2 and rank["resumed_from"] == 2
        assert rank["worst"] == 0.0  # resumed weights equal the uninterrupted run's
