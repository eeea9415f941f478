"""DeepSpeed ZeRO-3 under bf16 trains, and saves, the bf16 weights the reference pass runs on
(issue 20, item 10): `zero.Init(module=...)` partitions the weights in the dtype they have."""

from __future__ import annotations

import json

import pytest
import torch

from ibridge.zero import engine_weights_dtype
from tests.torchrun import run_worker
from tests.weighting_case import tiny_model


def test_the_engine_keeps_the_weights_in_the_precision_of_the_run():
    assert engine_weights_dtype("bf16") == torch.bfloat16
    assert engine_weights_dtype("fp16") == torch.float16
    assert engine_weights_dtype("fp32") == torch.float32


@pytest.mark.slow
def test_zero3_bf16_partitions_and_checkpoints_bf16_and_starts_at_zero_implicit_reward(tmp_path):
    pytest.importorskip("deepspeed", reason="the deepspeed extra (make setup-deepspeed; make test installs it)")
    model = tiny_model()
    with torch.no_grad():  # larger weights, so that bf16 rounding moves the log-probs visibly
        for param in model.parameters():
            if param.ndim == 2:
                param.mul_(8)
    folder = tmp_path / "model"
    model.save_pretrained(folder, safe_serialization=True)  # fp32 on disk, as an SFT checkpoint
    out = tmp_path / "report.json"
    run_worker("zero_precision_worker.py", str(folder), str(out), timeout=600)
    report = json.loads(out.read_text())
    assert set(report) == {"load_trainable", "fp32 module"}
    for case, row in report.items():
        assert row["partitions"] == ["torch.bfloat16"], (case, row)
        assert row["checkpoint"] == ["torch.bfloat16"], (case, row)
        # Before its first update the policy is the reference: the same bf16 weights, so the
        # first step's implicit reward is zero (exactly, on the development machine). fp32
        # partitions read logps/policy -56.2403 against logps/ref -56.2358 here (8e-5 relative).
        assert abs(row["logps/policy"] - row["logps/ref"]) <= 1e-5 * abs(row["logps/ref"]), (case, row)
        assert abs(row["implicit/reward"]) <= 1e-5 * abs(row["logps/ref"]), (case, row)
