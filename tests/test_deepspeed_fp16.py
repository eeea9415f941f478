"""DeepSpeed fp16: a step the loss scaler skips is logged and training goes on (issue 20, item 2).

Under ``trainer=deepspeed trainer.precision=fp16`` the dynamic loss scale starts at 2**16 and
overflows routinely in the first steps; DeepSpeed then skips the update and lowers the scale.
ibridge read the engine's infinite gradient norm as a diverged run and stopped with
NonFiniteLoss. Driven through DeepSpeed's documented engine API (tests/fake_deepspeed.py).
"""

from __future__ import annotations

import pytest
import torch

from ibridge.distributed import DistInfo
from ibridge.runtime import Runtime
from ibridge.training import NonFiniteLoss, OptimSettings, optimise
from tests.fake_deepspeed import FakeEngine, install
from tests.weighting_case import examples, parts, tiny_model

DEEPSPEED = Runtime(device=torch.device("cpu"), precision="fp32", dist=DistInfo(mode="deepspeed", zero_stage=2))


def train(overflow_steps, monkeypatch, steps: int = 6):
    install(monkeypatch, overflow_steps)
    _, compute, collate, count = parts("sft")
    logged: dict[int, dict] = {}
    model = tiny_model()
    settings = OptimSettings(lr=1e-2, max_steps=steps, batch_size=2, grad_accum=2, log_every=3, pack_sequences=False)
    optimise(model, examples("sft"), collate, compute, settings, DEEPSPEED,
             log=lambda metrics, step: logged.setdefault(step, {}).update(metrics), count_units=count)
    return model, logged


def test_overflowed_fp16_steps_are_skipped_logged_and_training_goes_on(monkeypatch):
    model, logged = train({1, 2}, monkeypatch)
    engine = FakeEngine.made[-1]
    assert engine.skipped_steps == 2 and engine.boundary_steps == 6
    assert logged[3]["train/skipped_steps"] == 2.0 and logged[6]["train/skipped_steps"] == 2.0
    # The grad-norm mean is over the applied steps only (one in the first window), never inf.
    assert all(torch.isfinite(torch.tensor(metrics["train/grad_norm"])) for metrics in logged.values())
    # The weights moved in the four applied steps, and the schedule advanced only with them.
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), tiny_model().parameters(), strict=True))
    assert engine.lr_scheduler.last_epoch == 4


def test_a_non_finite_norm_of_an_applied_step_still_stops_the_stage(monkeypatch):
    install(monkeypatch)
    original = FakeEngine.step

    def diverging(self):
        original(self)
        if self.boundary and self.boundary_steps == 2:
            self._norm = float("nan")  # applied, yet the gradient norm is NaN: a real divergence

    monkeypatch.setattr(FakeEngine, "step", diverging)
    _, compute, collate, count = parts("sft")
    with pytest.raises(NonFiniteLoss, match="gradient norm is nan at step 2"):
        optimise(tiny_model(), examples("sft"), collate, compute,
                 OptimSettings(lr=1e-2, max_steps=4, batch_size=2, pack_sequences=False), DEEPSPEED, count_units=count)


def test_fp16_in_one_process_is_refused_where_no_loss_scaler_would_run():
    """Only DeepSpeed's engine scales the loss. ``trainer=deepspeed`` started as one process
    (no launcher) is refused before anything loads, and fp16 under any other trainer is
    refused: fp16 there would train on underflowing gradients without a word."""
    from omegaconf import OmegaConf

    from ibridge.config import ConfigError
    from ibridge.runtime import resolve_runtime

    cfg = OmegaConf.create({"device": "cpu", "precision": "fp16", "attn_implementation": "eager",
                            "distributed": "deepspeed", "deepspeed": {"zero_stage": 2}})
    with pytest.raises(ConfigError, match="trainer.distributed=deepspeed needs several processes"):
        resolve_runtime(cfg)
    cfg.distributed = "none"
    with pytest.raises(ConfigError, match="trainer.precision=fp16 needs DeepSpeed's loss scaler"):
        resolve_runtime(cfg)
