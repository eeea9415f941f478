"""The fast tier's resume test: a stage stopped after a saved state and resumed in the same
folder ends as the uninterrupted stage does, in its whole summary (steps, tokens seen, final
metrics) and its weights. In process, on a tiny model, in seconds; tests/test_resume.py kills
real runs (slow).
"""

from __future__ import annotations

import pytest
import torch

from ibridge.data.collate import pad_sequences
from ibridge.models import causal_lm_loss
from ibridge.runtime import Runtime
from ibridge.training import OptimSettings, optimise
from tests.weighting_case import VOCAB, tiny_model

CPU = Runtime(device=torch.device("cpu"), precision="fp32")
SETTINGS = OptimSettings(lr=1e-2, max_steps=9, batch_size=3, save_every=4, log_every=2, warmup_ratio=0.2, seed=5)


class Stop(Exception):
    pass


def _items() -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    items = []
    for _ in range(10):
        ids = torch.randint(3, VOCAB, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen).tolist()
        items.append({"input_ids": ids, "labels": list(ids)})
    return items


def _train(state_dir, stop_at: int | None = None):
    torch.manual_seed(0)
    model = tiny_model()
    logged = {}

    def log(metrics, step):
        logged[step] = dict(metrics)
        if stop_at is not None and step == stop_at:
            raise Stop  # a kill after the state of step 4 was saved, before the end

    summary = optimise(model, _items(), lambda batch: pad_sequences(batch, 0), causal_lm_loss, SETTINGS, CPU,
                       log=log, state_dir=state_dir)
    return model, summary, logged


def test_a_resumed_stage_ends_with_the_uninterrupted_summary_and_weights(tmp_path):
    torch.set_num_threads(1)
    straight, expected, logged = _train(tmp_path / "straight")
    with pytest.raises(Stop):
        _train(tmp_path / "resumed", stop_at=6)
    resumed, summary, relogged = _train(tmp_path / "resumed")
    assert summary.resumed_from == 4 and expected.resumed_from == 0
    # The whole record, not only weights and metrics: a resumed stage that forgot the tokens it
    # had seen before the kill would report fewer.
    assert (summary.steps, summary.tokens) == (expected.steps, expected.tokens)
    assert expected.tokens > 0
    assert summary.final_metrics.keys() == expected.final_metrics.keys()
    for key, value in expected.final_metrics.items():
        if key != "train/tokens_per_s":  # wall-clock
            assert summary.final_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert sorted(relogged) == [6, 8, 9]  # logging resumed after the saved step
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)

