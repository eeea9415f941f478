"""One meaning per key in every job, and each stage's wandb run holds its own settings
(ibridge/stage_settings.py; issue: `train objective=dpo dpo.lr=1e-5` trained at 1e-3)."""

from __future__ import annotations

import json

import pytest
import yaml

from ibridge.tracking import read_metrics
from tests.conftest import compose_config, ibridge
from tests.wandb_offline import read_runs


def test_train_of_a_preference_stage_trains_at_dpo_lr(smoke_run, tmp_path, model_cache):
    sft = json.loads((smoke_run / "results.json").read_text())["stages"]["sft"]["checkpoint"]
    ibridge(["train", "debug=smoke", "trainer.num_threads=1", "objective=dpo", "dpo.lr=1e-5", "dpo.max_steps=3",
             "dpo.log_every=1", f"checkpoint={sft}", "logger=none", "hydra.run.dir=run"], tmp_path, model_cache)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["stages"]["dpo"]["lr"] == 1e-5
    logged = [r["train/lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/lr" in r]
    assert logged and 0 < max(logged) <= 1e-5  # what the optimiser used (cosine schedule with warmup)
    assert results["cell"].startswith("dpo-lr1e-5-s0")


@pytest.mark.parametrize(("args", "key", "hint"), [
    (["objective=dpo", "lr=1e-5"], "lr=1e-5", "dpo.lr"),
    (["objective=jsd", "dpo.lr=1e-5"], "dpo.lr=1e-5", "lr and sft.*"),
])
def test_a_key_train_would_ignore_is_refused_in_one_line(args, key, hint, tmp_path, model_cache):
    proc = ibridge(["train", "debug=smoke", "logger=none", *args, "hydra.run.dir=run"], tmp_path, model_cache,
                   check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = proc.stderr.strip()
    assert message.count("\n") == 0 and message.startswith(f"ibridge: config error: {key}: not read by train")
    assert hint in message
    assert not (tmp_path / "run" / "sft").exists() and not (tmp_path / "run" / "dpo").exists()


def test_which_stage_and_lr_each_job_reads():
    from ibridge.stage_settings import ignored_reason, stage_lr, trained_stage

    cfg = compose_config(["job=train", "objective=dpo"])
    assert trained_stage(cfg) == "dpo" and stage_lr(cfg, "dpo") == 5e-4 == cfg.dpo.lr  # the pipeline's DPO default
    cfg = compose_config(["job=train", "objective=asft", "lr=3e-4"])
    assert trained_stage(cfg) == "sft" and stage_lr(cfg, "sft") == 3e-4
    pipeline = compose_config([])
    assert ignored_reason(pipeline, "checkpoint") and ignored_reason(pipeline, "dpo.lr") is None
    assert ignored_reason(pipeline, "lr") is None and ignored_reason(pipeline, "objective@dpo.objective") is None
    assert ignored_reason(compose_config(["job=eval"]), "lr") is None  # eval reads no training key, refuses none
    dpo = compose_config(["job=train", "objective=ipo"])
    assert "dpo.*" in ignored_reason(dpo, "sft.epochs") and "objective.beta" in ignored_reason(dpo, "dpo.objective.beta")
    assert ignored_reason(dpo, "objective@dpo.objective") and ignored_reason(dpo, "dpo.epochs") is None
    assert ignored_reason(dpo, "objective.beta") is None
    sft = compose_config(["job=train", "objective=jsd"])
    assert ignored_reason(sft, "dpo.epochs") and ignored_reason(sft, "sft.epochs") is None


def test_train_cell_names_say_the_stage_lr():
    from ibridge.naming import cell_tag

    cfg = compose_config(["job=train", "objective=dpo", "dpo.lr=1e-5"])
    assert cell_tag(cfg, ["objective=dpo", "dpo.lr=1e-5"]) == "dpo-lr1e-5-s0"
    cfg = compose_config(["job=train", "objective=sft", "lr=3e-4"])
    assert cell_tag(cfg, ["objective=sft", "lr=3e-4"]) == "sft-lr3e-4-s0"


def test_each_stage_run_holds_its_own_settings(smoke_run):
    """The pipeline's DPO run used to carry the SFT rate (lr: 0.001) in its config."""
    results = json.loads((smoke_run / "results.json").read_text())
    config = yaml.safe_load((smoke_run / "config.yaml").read_text())
    runs = {r.job_type: r for r in read_runs(smoke_run, "wandb/offline-run-*") if r.job_type in ("sft", "dpo")}
    sft, dpo = runs["sft"].config, runs["dpo"].config
    assert dpo["lr"] == results["stages"]["dpo"]["lr"] == config["dpo"]["lr"] != config["lr"]
    assert dpo["objective"] == config["dpo"]["objective"] and dpo["stage"] == "dpo"
    assert dpo["dpo"] == {k: v for k, v in config["dpo"].items() if k != "objective"} and "sft" not in dpo
    assert dpo["init"] == dpo["reference"] == results["stages"]["sft"]["checkpoint"]
    assert sft["lr"] == results["stages"]["sft"]["lr"] == config["lr"]
    assert sft["objective"] == config["objective"] and sft["sft"] == config["sft"] and "dpo" not in sft
    for run in (sft, dpo):  # the rest of the resolved config and the cell's identity stay
        assert run["model"] == config["model"] and run["ibridge"]["cell"] == results["cell"]
