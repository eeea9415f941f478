"""The stage setting `optimizer` (adamw | sgd): the control of REPRODUCTION.md's optimiser axis.

AdamW normalises away a uniform rescaling of the loss (tests/test_fdivergence_theory.py, part a),
so an f-divergence objective can act under AdamW only through the relative weights it gives
examples. Plain SGD does not: there a loss scaled by beta is a learning rate scaled by beta.
These tests check that `optimizer=sgd` really is plain SGD (against a hand-written update), that
it differs from AdamW, and that a bad value is a one-line config error.
"""

from __future__ import annotations

import pytest
import torch

from ibridge.objectives import build_objective, token_logps
from ibridge.runtime import Runtime
from ibridge.training import OptimSettings, optimise
from tests.test_fdivergence_theory import TinyLM, make_batch


def _items():
    input_ids, labels = make_batch()
    ref_logps, _ = token_logps(TinyLM(seed=1)(input_ids).detach(), labels)
    return [{"input_ids": i, "labels": lab, "ref_logps": r}
            for i, lab, r in zip(input_ids, labels, ref_logps, strict=True)]


def _collate(rows):
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return batch


def _train(optimizer: str, beta: float = 1.0, steps: int = 5, lr: float = 0.1) -> torch.Tensor:
    """`steps` full-batch steps of tv (sft times beta) through the trainer, constant lr, no clipping."""
    objective = build_objective({"name": "tv", "beta": beta})

    def compute(model, batch):
        logps, mask = token_logps(model(batch["input_ids"]), batch["labels"])
        return objective(logps, batch["ref_logps"], mask)

    items = _items()
    settings = OptimSettings(lr=lr, max_steps=steps, batch_size=len(items), warmup_ratio=0.0, schedule="constant",
                             log_every=1, max_grad_norm=1e12, pack_sequences=False, optimizer=optimizer)
    policy = TinyLM(seed=0)
    optimise(policy, items, _collate, compute, settings, Runtime(torch.device("cpu"), "fp32"))
    return torch.cat([p.detach().flatten() for p in policy.parameters()])


def _hand_sgd(beta: float = 1.0, steps: int = 5, lr: float = 0.1) -> torch.Tensor:
    """The same steps written out: w <- w - lr * grad of tv's loss (the batch is the whole data)."""
    objective = build_objective({"name": "tv", "beta": beta})
    batch = _collate(_items())
    model = TinyLM(seed=0)
    params = list(model.parameters())
    for _ in range(steps):
        logps, mask = token_logps(model(batch["input_ids"]), batch["labels"])
        grads = torch.autograd.grad(objective(logps, batch["ref_logps"], mask).loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= lr * g
    return torch.cat([p.detach().flatten() for p in params])


def test_sgd_is_plain_gradient_descent():
    torch.testing.assert_close(_train("sgd"), _hand_sgd(), rtol=0, atol=1e-10)


def test_sgd_trains_and_differs_from_adamw():
    start = torch.cat([p.detach().flatten() for p in TinyLM(seed=0).parameters()])
    sgd, adamw = _train("sgd"), _train("adamw")
    assert (sgd - start).abs().max() > 1e-2  # SGD moved the weights
    assert (sgd - adamw).abs().max() > 1e-2  # and not as AdamW did


def test_under_sgd_a_loss_scale_is_a_learning_rate():
    # tv with beta 0.5 at lr 0.1 is sft at lr 0.05 under SGD (and the same as beta 1 under AdamW
    # without clipping, tests/test_fdivergence_theory.py): the scale reaches the update.
    torch.testing.assert_close(_train("sgd", beta=0.5), _train("sgd", beta=1.0, lr=0.05), rtol=0, atol=1e-10)
    assert (_train("sgd", beta=0.5) - _train("sgd", beta=1.0)).abs().max() > 1e-3


def test_unknown_optimizer_is_a_config_error():
    from ibridge.config import ConfigError, validate
    from tests.conftest import compose_config

    cfg = compose_config(["sft.optimizer=lion"])
    with pytest.raises(ConfigError, match=r"^sft\.optimizer='lion': expected adamw or sgd$"):
        validate(cfg)
    with pytest.raises(ValueError, match="optimizer='lion'"):
        _train("lion")
