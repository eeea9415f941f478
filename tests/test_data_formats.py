"""Rows in the formats users bring (TRL, ShareGPT, Alpaca), read from small files in those formats.

The rows follow TRL's dataset-format guide (prompt-completion text and conversational;
preference with an explicit conversational prompt), ShareGPT (``conversations`` of
``from``/``value``, as FastChat and LLaMA-Factory read it) and Alpaca
(``instruction``/``input``/``output``).
"""

from __future__ import annotations

import json
import re

import pytest

from ibridge.config import ConfigError, validate
from ibridge.data import DataError, source_for
from tests.conftest import compose_config
from tests.test_cli_smoke import ibridge
from tests.test_data_encoding import build_model_dir
from tests.test_data_sources import write_jsonl

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


TRL_PROMPT_COMPLETION = [{"prompt": "The sky is", "completion": " blue."}]
TRL_CONVERSATIONAL_PROMPT_COMPLETION = [
    {"prompt": [msg(USER, "What color is the sky?")], "completion": [msg(ASSISTANT, "It is blue.")]},
    {"prompt": [msg(SYSTEM, "Be brief."), msg(USER, "Hi"), msg(ASSISTANT, "Hello."), msg(USER, "Colour of grass?")],
     "completion": [msg(ASSISTANT, "Green.")]},
]
TRL_CONVERSATIONAL_PREFERENCE = [
    {"prompt": [msg(USER, "What color is the sky?")], "chosen": [msg(ASSISTANT, "It is blue.")],
     "rejected": [msg(ASSISTANT, "It is green.")]},
]
SHAREGPT = [
    {"id": "a1", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"},
                                   {"from": "human", "value": "Again?"}, {"from": "gpt", "value": "Hi again!"}]},
    {"conversations": [{"from": "system", "value": "Terse."}, {"from": "human", "value": "2+2?"},
                       {"from": "gpt", "value": "4"}]},
]
SHAREGPT_PREFERENCE = [  # LLaMA-Factory's ShareGPT preference form
    {"conversations": [{"from": "human", "value": "2+2?"}], "chosen": {"from": "gpt", "value": "4"},
     "rejected": {"from": "gpt", "value": "5"}},
]
ALPACA = [
    {"instruction": "Give the sum.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Name a fruit.", "output": "Apple.", "system": "Answer in one word."},
]


def read(tmp_path, rows: list, kind: str, name: str = "rows.jsonl") -> list[dict]:
    path = write_jsonl(tmp_path / name, rows)
    examples = source_for({"kind": "jsonl", "examples": kind, "path": str(path)}).examples(kind)
    return [{k: v for k, v in ex.items() if k != "origin"} for ex in examples]


def test_trl_prompt_completion_text_and_conversational(tmp_path):
    assert read(tmp_path, TRL_PROMPT_COMPLETION, "demonstrations") == [{"prompt": "The sky is", "response": " blue."}]
    first, second = read(tmp_path, TRL_CONVERSATIONAL_PROMPT_COMPLETION, "demonstrations")
    assert first == {"prompt": [msg(USER, "What color is the sky?")], "response": "It is blue."}
    # a multi-turn prompt: only the completion is trained on (no "messages": earlier replies are context)
    assert second == {"prompt": TRL_CONVERSATIONAL_PROMPT_COMPLETION[1]["prompt"], "response": "Green."}


def test_trl_conversational_preference_with_an_explicit_prompt(tmp_path):
    assert read(tmp_path, TRL_CONVERSATIONAL_PREFERENCE, "preferences") == [
        {"prompt": [msg(USER, "What color is the sky?")], "chosen": "It is blue.", "rejected": "It is green."}]


def test_sharegpt_conversations(tmp_path):
    first, second = read(tmp_path, SHAREGPT, "demonstrations")
    conversation = [msg(USER, "Say hi."), msg(ASSISTANT, "Hi!"), msg(USER, "Again?"), msg(ASSISTANT, "Hi again!")]
    assert first == {"prompt": conversation[:-1], "response": "Hi again!", "messages": conversation}
    assert second == {"prompt": [msg(SYSTEM, "Terse."), msg(USER, "2+2?")], "response": "4"}
    assert read(tmp_path, SHAREGPT_PREFERENCE, "preferences") == [
        {"prompt": [msg(USER, "2+2?")], "chosen": "4", "rejected": "5"}]


def test_alpaca_instruction_input_output(tmp_path):
    assert read(tmp_path, ALPACA, "demonstrations") == [
        {"prompt": "Give the sum.\n\n2 and 3", "response": "5"},
        {"prompt": "Name a colour.", "response": "Blue."},
        {"prompt": [msg(SYSTEM, "Answer in one word."), msg(USER, "Name a fruit.")], "response": "Apple."},
    ]


@pytest.mark.parametrize(("row", "expected"), [
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]},
     "line 1: conversations[1].from must be one of"),
    ({"conversations": [{"role": "user", "content": "x"}]}, "line 1: conversations[0] must be an object with 'from'"),
    ({"prompt": [msg(USER, "x")], "completion": [msg(ASSISTANT, "a"), msg(ASSISTANT, "b")]},
     "line 1: completion must be text or a list of one assistant message"),
    ({"instruction": "x", "input": 3, "output": "y"}, "line 1: input must be a string (Alpaca)"),
    ({"prompt": "x", "completion": "y", "label": True}, "unpaired preference row"),
])
def test_a_bad_row_names_its_line_and_field(tmp_path, row, expected):
    with pytest.raises(DataError, match=re.escape(expected)):
        read(tmp_path, [row], "demonstrations")


def test_a_row_of_the_other_kind_names_data_examples(tmp_path):
    with pytest.raises(DataError, match="set data.examples=preferences"):
        read(tmp_path, TRL_CONVERSATIONAL_PREFERENCE, "demonstrations")
    with pytest.raises(DataError, match="set data.examples=demonstrations"):
        read(tmp_path, SHAREGPT, "preferences")


def test_the_kind_error_says_how_to_supply_preferences(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", TRL_CONVERSATIONAL_PREFERENCE)
    cfg = compose_config(["job=train", "objective=dpo", "data=jsonl", f"data.path={path}"])
    with pytest.raises(ConfigError, match="if data.path holds preferences, set data.examples=preferences"):
        validate(cfg)
    cfg = compose_config(["data=jsonl", f"data.path={path}"])  # the pipeline: demonstrations and preferences
    with pytest.raises(ConfigError, match=r"\+data.preferences_from="):
        validate(cfg)
    # ...and the override the hint gives is accepted as written
    hinted = ["data=jsonl", f"data.path={path}", "data.examples=preferences",
              f"+data.demonstrations_from={{kind: jsonl, examples: demonstrations, path: {path}}}"]
    assert "preferences" in source_for(compose_config(hinted).data).kinds


@pytest.mark.slow
def test_sft_on_sharegpt_and_alpaca_then_dpo_on_trl_pairs_through_the_cli(tmp_path):
    model = build_model_dir(tmp_path / "tiny-model")
    files = {name: write_jsonl(tmp_path / f"{name}.jsonl", rows) for name, rows in (
        ("sharegpt", SHAREGPT), ("alpaca", ALPACA), ("pairs", TRL_CONVERSATIONAL_PREFERENCE * 2))}
    common = ["model=qwen2_5_0_5b", f"model.name_or_path={model}", "trainer=cpu", "logger=none", "data=jsonl"]
    sft, dpo = ["lr=1e-2", "sft.batch_size=2"], ["dpo.lr=1e-2", "dpo.batch_size=2"]  # each stage's own keys
    cache = tmp_path / "cache"
    for name in ("sharegpt", "alpaca"):
        ibridge(["train", *common, *sft, "objective=sft", f"data.path={files[name]}", "sft.max_steps=2",
                 f"hydra.run.dir={name}"], tmp_path, cache)
        record = json.loads((tmp_path / name / "results.json").read_text())["stages"]["sft"]
        assert record["steps"] == 2 and record["examples"] == {"sharegpt": 2, "alpaca": 3}[name]
    checkpoint = json.loads((tmp_path / "alpaca" / "results.json").read_text())["stages"]["sft"]["checkpoint"]
    proc = ibridge(["train", *common, *dpo, "objective=dpo", f"data.path={files['pairs']}", f"checkpoint={checkpoint}",
                    "hydra.run.dir=dpo"], tmp_path, cache, check=False)
    assert proc.returncode == 2 and "set data.examples=preferences" in proc.stderr  # the error that needs it
    ibridge(["train", *common, *dpo, "objective=dpo", f"data.path={files['pairs']}", "data.examples=preferences",
             f"checkpoint={checkpoint}", "dpo.max_steps=2", "hydra.run.dir=dpo"], tmp_path, cache)
    assert json.loads((tmp_path / "dpo" / "results.json").read_text())["stages"]["dpo"]["examples"] == 2
