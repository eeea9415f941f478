"""`ibridge export`: a hub folder with a model card, offline (no token: no push) and with a token
(the push, against a stand-in for the hub API); LoRA stages save their adapters."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from ibridge.export import command_of, provenance, push
from tests.test_cli_smoke import ibridge

NO_TOKEN = {"HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": ""}


def test_export_writes_a_model_card_and_a_folder_ready_to_upload(smoke_run, tmp_path, model_cache):
    results = json.loads((smoke_run / "results.json").read_text())
    checkpoint = results["stages"]["dpo"]["checkpoint"]
    env = {**NO_TOKEN, "HF_HOME": str(tmp_path / "hf-home")}  # no stored token either
    proc = ibridge(["export", f"checkpoint={checkpoint}", "hub_id=me/toy-dpo", "logger=none", "hydra.run.dir=exp"],
                   tmp_path, model_cache, env=env)
    export = json.loads((tmp_path / "exp" / "results.json").read_text())["export"]
    folder = Path(export["folder"])
    assert export["pushed"] is False and folder == tmp_path / "exp" / "hub" / "toy-dpo"
    assert f"upload me/toy-dpo {folder} ." in proc.stdout  # the command that uploads it, printed
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md"):
        assert (folder / name).is_file(), name
    assert (folder / "model.safetensors").read_bytes() == (Path(checkpoint) / "model.safetensors").read_bytes()

    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and {"ibridge", "sft", "dpo"} <= set(card.data.tags)
    text = card.text
    assert "toy base model" in text  # the base
    assert "ibridge's toy world (data=toy" in text  # the data
    assert "| sft | sft |" in text and "| 1e-3 |" in text and "| dpo | dpo | beta=0.1" in text  # objectives, lrs
    assert "| 5e-4 |" in text
    for stage in ("base", "sft", "dpo"):  # the evaluation table, with the run's numbers
        ev = results["eval_by_stage"][stage]
        assert f"| {stage} | {ev['gold_reward']:.3f} | {ev['win_rate']:.3f}" in text
    assert "ibridge debug=smoke trainer.num_threads=1 hydra.run.dir=run" in text  # the command that made it


def test_export_refuses_a_missing_checkpoint_and_a_bad_hub_id(smoke_run, tmp_path, model_cache):
    proc = ibridge(["export", "logger=none", "hydra.run.dir=exp"], tmp_path, model_cache, check=False)
    assert proc.returncode == 2 and "export needs checkpoint=" in proc.stderr
    checkpoint = json.loads((smoke_run / "results.json").read_text())["stages"]["sft"]["checkpoint"]
    proc = ibridge(["export", f"checkpoint={checkpoint}", "hub_id=no-slash", "logger=none"], tmp_path, model_cache,
                   check=False)
    assert proc.returncode == 2 and "hub_id=no-slash: expected <user or organisation>/<name>" in proc.stderr


class FakeHub:
    """Records what the hub API was asked to do (no network)."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return SimpleNamespace(url=f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))


def test_push_creates_the_repository_and_uploads_the_folder(tmp_path):
    hub = FakeHub()
    url = push(tmp_path, "me/model", "hf_token", private=True, message="ibridge export", api=hub)
    assert url == "https://huggingface.co/me/model"
    assert hub.calls[0] == ("create_repo", "me/model", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert hub.calls[1] == ("upload_folder", {"folder_path": str(tmp_path), "repo_id": "me/model",
                                              "repo_type": "model", "commit_message": "ibridge export"})


@pytest.mark.parametrize(("token", "push_setting", "pushed"), [("hf_x", "auto", True), (None, "auto", False),
                                                                ("hf_x", False, False)])
def test_the_job_pushes_only_with_a_token(smoke_run, tmp_path, monkeypatch, token, push_setting, pushed):
    from ibridge.jobs import export as export_job

    calls = []
    monkeypatch.setattr("huggingface_hub.get_token", lambda: token)
    monkeypatch.setattr(export_job, "push", lambda folder, hub_id, *a, **k: calls.append((folder, hub_id)) or "url")
    checkpoint = json.loads((smoke_run / "results.json").read_text())["stages"]["sft"]["checkpoint"]
    cfg = OmegaConf.create({"checkpoint": checkpoint, "hub_id": "me/m", "export": {"push": push_setting}})
    ctx = SimpleNamespace(cfg=cfg, run_dir=tmp_path, results={})
    export_job.run(ctx)
    assert ctx.results["export"]["pushed"] is pushed and bool(calls) is pushed
    assert pushed or "upload me/m" in ctx.results["export"]["upload_command"]


def test_provenance_follows_the_stages_back_to_the_base(smoke_run):
    results = json.loads((smoke_run / "results.json").read_text())
    prov = provenance(Path(results["stages"]["dpo"]["checkpoint"]))
    assert [stage for stage, _ in prov.stages] == ["sft", "dpo"]
    assert prov.base == results["stages"]["sft"]["init"]
    assert command_of(prov.results, prov.hydra_overrides) == "ibridge debug=smoke trainer.num_threads=1 hydra.run.dir=run"
