"""Token-weighted losses stay token-weighted across micro-batches and ranks; epochs are epochs.

The independent computation is always the same examples in one batch, one backward
(tests/weighting_case.py): an optimiser step over uneven micro-batches (grad_accum 4, a
short last micro-batch, 2 DDP ranks with a stand-in) must hand the optimiser that gradient,
and log that batch's loss and metrics (each weighted by its own units: pairs, sequences or
scored tokens).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from ibridge.batching import micro_batch_weight, optimiser_steps, steps_per_epoch
from ibridge.objectives import ObjectiveOutput
from ibridge.runtime import Runtime
from ibridge.training import OptimSettings, optimise
from tests.torchrun import run_worker
from tests.weighting_case import OBJECTIVES, loop_gradient, one_batch_gradient

CPU = Runtime(device=torch.device("cpu"), precision="fp32")
# Every family of metric the objectives log, each with its own units; the case's objectives
# must log at least one key of each (test_the_case_covers_every_metric_family).
METRIC_FAMILIES = ("rewards/", "logps/", "implicit/", "kl/anchor", "train/nll_per_token")


def _assert_same(grads, ref_grads, logged, reference):
    for key, value in reference.items():
        assert key in logged, f"{key} not logged"
        assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", list(OBJECTIVES))
@pytest.mark.parametrize("batch_size,grad_accum", [(7, 1), (2, 4), (1, 7)])
def test_one_step_over_micro_batches_has_the_one_batch_gradient_and_metrics(kind, batch_size, grad_accum,
                                                                            monkeypatch):
    torch.set_num_threads(1)
    reference, ref_grads = one_batch_gradient(kind)
    logged, grads = loop_gradient(kind, batch_size, grad_accum, CPU, monkeypatch)
    _assert_same(grads, ref_grads, logged, reference)


def test_the_case_covers_every_metric_family():
    keys = {key for kind in OBJECTIVES for key in one_batch_gradient(kind)[0]}
    for family in METRIC_FAMILIES:
        assert any(key.startswith(family) for key in keys), family


def test_a_two_token_demonstration_weighs_per_token_what_it_weighs_in_one_batch():
    # The measurement: alone in a micro-batch, a 2-token demonstration's tokens got
    # 1/2 of a micro-batch's weight each, in one batch 1/107 of it. Now: units / step units.
    assert micro_batch_weight(2, 107) * (1 / 2) == pytest.approx(1 / 107)
    assert micro_batch_weight(2, 107, world_size=2) == pytest.approx(4 / 107)  # DDP then halves it
    assert micro_batch_weight(0, 107) == 0.0  # a stand-in


def test_the_fast_tiers_two_rank_case_token_averaged_sft_has_the_one_batch_gradient(tmp_path):
    # `make test-fast`'s multi-rank weighting test: one objective, one torchrun of 2 gloo ranks.
    out = tmp_path / "report.json"
    run_worker("loss_weighting_worker.py", str(out), "sft")
    diffs = json.loads(out.read_text())["sft"]
    assert set(diffs["metrics"]) == set(diffs["reference"])
    for key, gap in diffs["metrics"].items():  # the loss and every metric of the one batch
        assert gap <= 1e-5 * abs(diffs["reference"][key]) + 1e-6, (key, gap)
    assert diffs["grad_diff"] <= 1e-4 * diffs["grad_scale"] + 1e-6, diffs


@pytest.mark.slow
def test_two_ddp_ranks_with_grad_accum_have_the_one_batch_gradient(tmp_path):
    out = tmp_path / "report.json"
    run_worker("loss_weighting_worker.py", str(out))
    report = json.loads(out.read_text())
    assert set(report) == set(OBJECTIVES)
    for kind, diffs in report.items():
        assert set(diffs["metrics"]) == set(diffs["reference"])
        for key, gap in diffs["metrics"].items():  # the loss and every metric of the one batch
            assert gap <= 1e-5 * abs(diffs["reference"][key]) + 1e-6, (kind, key, gap)
        assert diffs["grad_diff"] <= 1e-4 * diffs["grad_scale"] + 1e-6, (kind, diffs)


@pytest.mark.parametrize("n,batch_size,grad_accum,world", [(130, 32, 4, 1), (130, 8, 3, 2), (7, 1, 4, 2), (5, 4, 1, 3)])
def test_every_example_once_per_epoch_on_every_rank_together(n, batch_size, grad_accum, world):
    per_epoch = steps_per_epoch(n, batch_size, grad_accum, world)
    streams = [optimiser_steps(n, batch_size, grad_accum, seed=3, rank=r, world_size=world) for r in range(world)]
    for epoch in range(2):
        seen: Counter = Counter()
        for _ in range(per_epoch):
            plans = [next(stream) for stream in streams]
            assert {e for e, _ in plans} == {epoch}
            assert len({len(plan) for _, plan in plans}) == 1, "ranks disagree on the number of micro-batches"
            assert all(1 <= len(plan) <= grad_accum for _, plan in plans)
            for _, plan in plans:
                for micro in plan:
                    assert micro.indices and len(micro.indices) <= batch_size
                    if not micro.stand_in:
                        seen.update(micro.indices)
        assert seen == Counter(range(n)), f"epoch {epoch}: not every example exactly once"


class _Recorder(torch.nn.Module):
    """A one-parameter 'model' whose loss is the mean of its examples' values."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))


def test_a_one_epoch_stage_sees_each_example_once_and_the_schedule_agrees():
    # The case: n=130, batch 32, grad_accum 4 used to run 2 steps of 4 full
    # micro-batches (226 examples seen); an epoch is now 128 + 2 examples.
    n = 130
    items = [{"id": i} for i in range(n)]
    seen: list[int] = []

    def collate(batch_items):
        seen.extend(item["id"] for item in batch_items)
        ids = torch.tensor([[item["id"]] for item in batch_items], dtype=torch.float32)
        return {"value": ids, "attention_mask": torch.ones_like(ids, dtype=torch.long)}

    def compute(model, batch):
        return ObjectiveOutput(loss=(model.w - batch["value"]).pow(2).mean())

    settings = OptimSettings(lr=1e-2, epochs=1, batch_size=32, grad_accum=4, log_every=1, warmup_ratio=0.0)
    logged: list = []
    summary = optimise(_Recorder(), items, collate, compute, settings, CPU,
                       log=lambda metrics, step: logged.append((step, metrics)),
                       count_units=lambda batch: batch["value"].shape[0])
    assert sorted(seen) == list(range(n))
    assert summary.steps == settings.total_steps(n) == 2 == len(logged)
    assert summary.tokens == n
    assert logged[-1][1]["train/lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine schedule ended with the epoch


def test_a_metric_without_units_is_refused_by_name():
    with pytest.raises(ValueError, match="rewards/chosen"):
        ObjectiveOutput(loss=torch.zeros(()), metrics={"rewards/chosen": torch.zeros(())})
