"""benchmarks/gpu_check.py: its CPU mode (fp32, small shapes) in CI, so that the GPU check cannot
rot, in the one-device shape the GPU machine has (``--ranks 1``) and with 2 gloo ranks; and its
report: independent sections, FAIL rows, the JSON always written, a one-screen verdict."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

from benchlib.gpu_report import Report, Skipped  # noqa: E402


def run_check(tmp_path, model_cache, *args: str) -> dict:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "IBRIDGE_CACHE": str(model_cache), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu", "--json", str(out),
                           *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text())  # written whatever happened
    failed = [(row["model"], row["check"], row["detail"]) for row in report["rows"] if row["status"] == "FAIL"]
    assert proc.returncode == 0 and not failed, (failed, proc.stderr[-3000:])
    assert "gpu_check verdict: PASS" in proc.stdout
    return report


@pytest.mark.slow
def test_the_gpu_check_passes_on_the_cpu_with_one_rank(tmp_path, model_cache):
    report = run_check(tmp_path, model_cache, "--ranks", "1")
    assert report["device"] == "cpu" and report["precision"] == "fp32" and report["passed"]
    status = {(row["model"], row["check"]): row["status"] for row in report["rows"]}
    for model in ("toy", "qwen"):
        for check in ("reference cache", "sft steps (fp32)", "jsd steps (fp32)", "dpo steps (fp32)",
                      "resume after SIGTERM", "generation", "token_kl", "lora merge"):
            assert status[(model, check)] == "ok", (model, check)
    for check in ("evaluate_checkpoint", "gradient checkpointing", "fsdp 1-rank + resume"):
        assert status[("toy", check)] == "ok", check
    assert status[("ddp", "collectives")] == "skip"  # one rank, as on one GPU: said so, not crashed
    gaps = [row["gap"] for row in report["rows"]
            if row["check"] in ("resume after SIGTERM", "fsdp 1-rank + resume") and row["status"] == "ok"]
    assert len(gaps) == 3 and all(gap == 0.0 for gap in gaps)  # bit for bit
    print(f"gpu_check --cpu --ranks 1: {report['seconds']:.0f} s")


@pytest.mark.slow
def test_the_collectives_run_on_two_gloo_ranks(tmp_path, model_cache):
    report = run_check(tmp_path, model_cache, "--ranks", "2", "--skip", "toy,qwen")
    (row,) = report["rows"]
    assert (row["check"], row["status"], row["backend"]) == ("collectives", "ok", "gloo")


def test_every_section_gets_its_row_whatever_the_others_do(tmp_path):
    out = tmp_path / "report.json"
    report = Report({"summary": "test"}, out)

    def crashes():
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type\nmore")

    def does_not_apply():
        raise Skipped("one GPU")

    report.section("toy", "token_kl", crashes)
    assert json.loads(out.read_text())["rows"][0]["status"] == "FAIL"  # written at once
    report.section("toy", "collectives", does_not_apply)
    report.section("toy", "lora merge", lambda: (True, "merged in fp32", {"error": 1e-8}))
    report.section("toy", "resume", lambda: (False, "gap 1e-3", {}))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["check"], r["status"]) for r in rows] == [("token_kl", "FAIL"), ("collectives", "skip"),
                                                        ("lora merge", "ok"), ("resume", "FAIL")]
    assert rows[0]["detail"] == "RuntimeError: FlashAttention only support fp16 and bf16 data type"
    assert rows[2]["error"] == 1e-8
    assert json.loads(out.read_text())["passed"] is False
    verdict = report.verdict().splitlines()
    assert any("verdict: FAIL - 1 ok, 2 FAIL, 1 skipped" in line for line in verdict)
    assert any("FAIL toy" in line and "token_kl" in line for line in verdict)
    assert not any("lora merge" in line for line in verdict)  # one screen: the ok rows are above it
    assert len(verdict) <= 24


def test_a_failed_set_up_fails_its_sections_with_the_reason_and_still_writes_the_json(tmp_path, monkeypatch):
    import gpu_check

    def no_model(runtime):
        def build():
            raise OSError("disk full")
        return build

    monkeypatch.setattr(gpu_check, "toy_builder", no_model)
    out = tmp_path / "report.json"
    assert gpu_check.main(["--cpu", "--ranks", "1", "--skip", "qwen", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    status = {row["check"]: row["status"] for row in report["rows"] if row["model"] == "toy"}
    assert status["reference cache"] == status["token_kl"] == status["fsdp 1-rank + resume"] == "FAIL"
    assert status["bf16 inference memory"] == "skip"
    assert all("disk full" in row["detail"] for row in report["rows"] if row["status"] == "FAIL")
    assert [row["status"] for row in report["rows"] if row["model"] == "ddp"] == ["skip"]
    assert not torch.distributed.is_initialized()  # the 1-rank group was torn down after its failure


def test_a_gathered_state_with_tied_weights_sharing_memory_saves():
    # One-rank FSDP on the CPU gathers tied weights (lm_head = embed_tokens) as one tensor under
    # two names; safetensors refuses shared memory, so the 1-rank resume check could not save.
    from safetensors.torch import load, save

    from ibridge.checkpointing import _unshared

    tied = torch.arange(6.0).reshape(2, 3)
    state = _unshared({"model.embed_tokens.weight": tied, "lm_head.weight": tied, "norm": torch.ones(3)})
    loaded = load(save(state))
    assert torch.equal(loaded["lm_head.weight"], tied) and torch.equal(loaded["model.embed_tokens.weight"], tied)
    assert state["model.embed_tokens.weight"] is tied  # only the repeat is copied
