"""The real setting's commands, end to end through the CLI, on a tiny model and tiny files in
UltraChat / UltraFeedback format: `train objective=sft data=ultrachat data.path=...`, then
`train objective=dpo data=ultrafeedback data.path=... checkpoint=<sft>`."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from tests.test_cli_smoke import ibridge
from tests.test_data_encoding import build_model_dir
from tests.test_data_sources import ULTRACHAT, ULTRACHAT_TEST, ULTRAFEEDBACK, write_jsonl, write_parquet


def test_sft_then_dpo_on_real_format_files_through_the_cli(tmp_path):
    model = build_model_dir(tmp_path / "tiny-model")
    chat = write_jsonl(tmp_path / "ultrachat.jsonl", ULTRACHAT)
    chat_test = write_jsonl(tmp_path / "ultrachat_test.jsonl", ULTRACHAT_TEST)
    prefs = write_parquet(tmp_path / "ultrafeedback.parquet", ULTRAFEEDBACK)
    cache = tmp_path / "cache"
    common = ["model=qwen2_5_0_5b", f"model.name_or_path={model}", "trainer=cpu", "logger=none"]

    ibridge(["train", *common, "objective=sft", "lr=1e-2", "data=ultrachat", f"data.path={chat}",
             f"data.heldout_path={chat_test}", "sft.max_steps=2", "sft.batch_size=2", "hydra.run.dir=sft"],
            tmp_path, cache)
    sft = json.loads((tmp_path / "sft" / "results.json").read_text())
    assert sft["status"] == "completed", sft
    record = sft["stages"]["sft"]
    assert record["steps"] == 2 and record["examples"] == len(ULTRACHAT) and "kl_token" in record
    checkpoint = record["checkpoint"]

    ibridge(["train", *common, "objective=dpo", "dpo.lr=1e-2", "data=ultrafeedback", f"data.path={prefs}", "dpo.max_steps=2",
             "dpo.batch_size=2", f"checkpoint={checkpoint}", "hydra.run.dir=dpo"], tmp_path, cache)
    dpo = json.loads((tmp_path / "dpo" / "results.json").read_text())
    assert dpo["status"] == "completed", dpo
    assert dpo["stages"]["dpo"]["examples"] == len(ULTRAFEEDBACK)
    before = load_file(f"{checkpoint}/model.safetensors")
    after = load_file(f"{dpo['stages']['dpo']['checkpoint']}/model.safetensors")
    assert any(not (before[k] == after[k]).all() for k in before)

