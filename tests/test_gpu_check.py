"""benchmarks/gpu_check.py in its CPU mode (fp32, small shapes), so that the GPU check cannot rot:
every check it would run on a GPU, except the bf16-only ones, runs and passes here."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_the_gpu_check_runs_and_passes_on_the_cpu(tmp_path, model_cache):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "IBRIDGE_CACHE": str(model_cache), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu", "--json", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["precision"] == "fp32"
    checks = {(row["model"], row["check"]) for row in report["rows"]}
    for model in ("toy", "qwen"):
        for check in ("reference cache", "sft steps (fp32)", "jsd steps (fp32)", "dpo steps (fp32)",
                      "resume after SIGTERM", "generation"):
            assert (model, check) in checks
    assert ("ddp", "collectives (gloo)") in checks
    assert all(row["ok"] for row in report["rows"])
    resume = [row for row in report["rows"] if row["check"] == "resume after SIGTERM"]
    assert all(row["gap"] == 0.0 for row in resume)  # bit for bit on the CPU
    print(f"gpu_check --cpu: {report['seconds']:.0f} s")
