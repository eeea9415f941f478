"""Run folder paths paste back into an override, and `checkpoint=<run folder>` finds its stage
(ibridge/run_folders.py). The issue: `checkpoint=outputs/train/lr=1e-6,objective=jsd/sft/checkpoint`
was a Hydra parse error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from ibridge.config import ConfigError
from tests.conftest import compose_config, ibridge


def parses_back(key: str, path: str) -> bool:
    (override,) = OverridesParser.create().parse_overrides([f"{key}={path}"])
    return override.value() == path


@pytest.mark.slow
def test_the_printed_run_folder_pastes_back_as_the_next_stage_checkpoint(tmp_path, model_cache):
    common = ["debug=smoke", "trainer.num_threads=1", "logger=none"]
    ibridge(["train", *common, "objective=jsd", "lr=1e-3", "sft.max_steps=2"], tmp_path, model_cache)
    (first,) = (tmp_path / "outputs" / "train").iterdir()  # named by the overrides, no hydra.run.dir
    sft = json.loads((first / "results.json").read_text())
    run_dir, checkpoint = sft["run_dir"], sft["stages"]["sft"]["checkpoint"]  # what the run printed
    assert not set("=,") & set(first.name), first.name
    assert parses_back("checkpoint", run_dir) and parses_back("checkpoint", checkpoint)

    proc = ibridge(["train", *common, "objective=dpo", "dpo.max_steps=2", f"checkpoint={run_dir}"], tmp_path,
                   model_cache)
    assert f"checkpoint={run_dir}: the sft stage's checkpoint" in proc.stdout + proc.stderr
    (second,) = {p for p in (tmp_path / "outputs" / "train").iterdir()} - {first}
    dpo = json.loads((second / "results.json").read_text())
    assert dpo["status"] == "completed" and Path(dpo["stages"]["dpo"]["init"]) == Path(checkpoint)
    assert Path(dpo["stages"]["dpo"]["reference"]) == Path(checkpoint)  # DPO's reference: the model it starts from


# --------------------------------------------------------------------------- names, by hand


def test_folder_names_keep_only_characters_that_paste():
    from ibridge.run_folders import MAX_NAME, folder_name

    assert folder_name("") == "default"
    assert folder_name("lr-1e-4+objective-jsd+seed-0") == "lr-1e-4+objective-jsd+seed-0"
    assert folder_name("model.lora.target_modules-[q_proj,v_proj]+data.path-/x/a b.jsonl") == \
        "model.lora.target_modules-_q_proj_v_proj_+data.path-_x_a_b.jsonl"
    assert folder_name("objective@dpo.objective-ipo") == "objective@dpo.objective-ipo"
    long_a, long_b = folder_name("+".join(f"k{i}-{i}" for i in range(80))), folder_name(
        "+".join(f"k{i}-{i}" for i in range(81)))
    assert len(long_a.encode()) <= MAX_NAME and len(long_b.encode()) <= MAX_NAME and long_a != long_b
    for name in ("lr-1e-4+objective-jsd", long_a, folder_name("a=b,c:d 'e' \"f\" $g *h ?i |j")):
        assert parses_back("checkpoint", f"outputs/train/{name}/sft/checkpoint"), name


def test_the_configured_separators_are_the_ones_named():
    from omegaconf import OmegaConf

    from ibridge.paths import config_dir
    from ibridge.run_folders import ITEM_SEP, KEY_VALUE_SEP

    dirname = OmegaConf.load(config_dir() / "config.yaml").hydra.job.config.override_dirname
    assert (dirname.kv_sep, dirname.item_sep) == (KEY_VALUE_SEP, ITEM_SEP)


# --------------------------------------------------------------------------- a run folder as a checkpoint


def _model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_a_run_or_stage_folder_resolves_to_its_stage_checkpoint(tmp_path):
    from ibridge.run_folders import stage_checkpoint

    model = _model(tmp_path / "model")
    assert stage_checkpoint(model, "checkpoint") == (model, None)
    train = tmp_path / "train"
    _model(train / "sft" / "checkpoint")
    assert stage_checkpoint(train, "checkpoint") == (train / "sft" / "checkpoint", "sft")
    assert stage_checkpoint(train / "sft", "checkpoint") == (train / "sft" / "checkpoint", "sft")
    pipeline = tmp_path / "pipeline"
    for stage in ("sft", "dpo"):
        _model(pipeline / stage / "checkpoint")
    assert stage_checkpoint(pipeline, "checkpoint", prefer="sft") == (pipeline / "sft" / "checkpoint", "sft")
    with pytest.raises(ConfigError) as caught:
        stage_checkpoint(pipeline, "checkpoint")
    message = str(caught.value)
    assert "2 stage checkpoints (sft, dpo)" in message
    assert f"checkpoint={pipeline / 'sft'} or checkpoint={pipeline / 'dpo'}" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a model folder .* nor a run folder with a stage checkpoint"):
        stage_checkpoint(tmp_path / "empty", "reference")
    assert stage_checkpoint(tmp_path / "missing", "checkpoint") == (tmp_path / "missing", None)  # validation says


def test_which_stage_each_job_takes_from_a_pipeline_run(tmp_path):
    from ibridge.run_folders import resolve_checkpoints

    pipeline = tmp_path / "pipeline"
    for stage in ("sft", "dpo"):
        _model(pipeline / stage / "checkpoint")
    cfg = compose_config(["job=train", "objective=dpo", f"checkpoint={pipeline}"])
    resolve_checkpoints(cfg)  # DPO starts from the SFT model
    assert cfg.checkpoint == str(pipeline / "sft" / "checkpoint") and cfg.reference is None
    cfg = compose_config(["job=eval", f"checkpoint={pipeline / 'dpo'}", f"reference={pipeline / 'sft'}"])
    resolve_checkpoints(cfg)
    assert (cfg.checkpoint, cfg.reference) == (str(pipeline / "dpo" / "checkpoint"), str(pipeline / "sft" / "checkpoint"))
    with pytest.raises(ConfigError, match="name one"):  # eval of a pipeline run: which model is not obvious
        resolve_checkpoints(compose_config(["job=eval", f"checkpoint={pipeline}"]))
