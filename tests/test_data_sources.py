"""Data sources on files in the real datasets' formats: UltraChat-200k, UltraFeedback binarized,
generic local JSONL / JSON / Parquet, folders and save_to_disk; and bad data, which must fail
naming file, row and field (or be counted when skipping is asked for)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ibridge.config import ConfigError, validate
from ibridge.data import DataError, source_for
from tests.conftest import compose_config

NON_ASCII = "Grüße, 東京 🚀"


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


# UltraChat-200k rows: prompt, prompt_id, messages (multi-turn, system message, non-ASCII).
ULTRACHAT = [
    {"prompt": "Name a colour.", "prompt_id": "p0", "messages": [
        msg("user", "Name a colour."), msg("assistant", "Blue."),
        msg("user", "Another one?"), msg("assistant", "Green, like grass."),
    ]},
    {"prompt": "Say hello.", "prompt_id": "p1", "messages": [
        msg("system", "You are terse."), msg("user", "Say hello."), msg("assistant", "Hello."),
    ]},
    {"prompt": f"Translate: {NON_ASCII}", "prompt_id": "p2", "messages": [
        msg("user", f"Translate: {NON_ASCII}"), msg("assistant", "Greetings, Tokyo 🚀"),
        msg("user", "Danke!"), msg("assistant", "Bitte schön — どういたしまして."),
        msg("user", "trailing question with no answer"),
    ]},
    {"prompt": "Count to three.", "prompt_id": "p3", "messages": [
        msg("user", "Count to three."), msg("assistant", "One, two, three."),
    ]},
]
ULTRACHAT_TEST = [
    {"prompt": "Held out?", "prompt_id": "h0", "messages": [msg("user", "Held out?"), msg("assistant", "Yes.")]},
]


def _pair(prompt_messages, chosen: str, rejected: str, pid: str) -> dict:
    chosen_msgs = [*prompt_messages, msg("assistant", chosen)]
    return {
        "prompt": prompt_messages[-1]["content"], "prompt_id": pid,
        "chosen": chosen_msgs, "rejected": [*prompt_messages, msg("assistant", rejected)],
        "messages": chosen_msgs, "score_chosen": 8.0, "score_rejected": 4.5,
    }


# UltraFeedback binarized rows: chosen/rejected message lists sharing all but the last message.
ULTRAFEEDBACK = [
    _pair([msg("user", "What is 2+2?")], "4.", "5, probably.", "q0"),
    _pair([msg("system", "Answer kindly."), msg("user", f"Greet me: {NON_ASCII}")],
          "Grüße zurück! 🚀", "no.", "q1"),
    _pair([msg("user", "Pick a fruit."), msg("assistant", "Apple."), msg("user", "Why?")],
          "It is crisp and sweet.", "Because.", "q2"),
]
ULTRAFEEDBACK_TEST = [_pair([msg("user", "Capital of Japan?")], "Tokyo (東京).", "Kyoto.", "t0")]


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return path


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "json"])
def test_ultrachat_file_gives_prompt_response_and_every_turn(tmp_path, fmt):
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "chat.jsonl", ULTRACHAT)
    elif fmt == "parquet":
        path = write_parquet(tmp_path / "chat.parquet", ULTRACHAT)
    else:
        path = tmp_path / "chat.json"
        path.write_text(json.dumps(ULTRACHAT, ensure_ascii=False), encoding="utf-8")
    source = source_for({"kind": "ultrachat", "path": str(path)})
    demos = source.examples("demonstrations")
    assert len(demos) == 4
    first = demos[0]
    assert first["prompt"] == ULTRACHAT[0]["messages"][:3] and first["response"] == "Green, like grass."
    assert first["messages"] == ULTRACHAT[0]["messages"]  # multi-turn: every assistant turn is trained on
    assert "messages" not in demos[1] and demos[1]["prompt"][0]["role"] == "system"
    assert demos[2]["messages"][-1]["content"] == "Bitte schön — どういたしまして."  # trailing user turn dropped
    assert NON_ASCII in demos[2]["prompt"][0]["content"]
    assert demos[0]["origin"].startswith(str(path))
    assert source.examples("heldout_demonstrations") == []  # a single file has no held-out split


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_ultrafeedback_file_gives_shared_prompt_and_last_replies(tmp_path, fmt):
    rows = ULTRAFEEDBACK
    path = write_jsonl(tmp_path / "p.jsonl", rows) if fmt == "jsonl" else write_parquet(tmp_path / "p.parquet", rows)
    test = write_jsonl(tmp_path / "test.jsonl", ULTRAFEEDBACK_TEST)
    source = source_for({"kind": "ultrafeedback", "path": str(path), "heldout_path": str(test)})
    pairs = source.examples("preferences")
    assert [p["chosen"] for p in pairs] == ["4.", "Grüße zurück! 🚀", "It is crisp and sweet."]
    assert pairs[1]["prompt"] == [msg("system", "Answer kindly."), msg("user", f"Greet me: {NON_ASCII}")]
    assert pairs[2]["prompt"][1] == msg("assistant", "Apple.")  # earlier turns are prompt
    assert pairs[2]["rejected"] == "Because."
    assert source.examples("heldout_pairs")[0]["chosen"] == "Tokyo (東京)."
    assert source.examples("eval") == [{"prompt": [msg("user", "Capital of Japan?")], "reference": "Tokyo (東京).",
                                        "origin": f"{test}, line 1"}]


def test_hub_snapshot_folder_reads_files_named_after_each_split(tmp_path):
    data = tmp_path / "ultrachat_200k" / "data"
    write_parquet(data / "train_sft-00000-of-00002.parquet", ULTRACHAT[:2])
    write_parquet(data / "train_sft-00001-of-00002.parquet", ULTRACHAT[2:])
    write_parquet(data / "test_sft-00000-of-00001.parquet", ULTRACHAT_TEST)
    write_parquet(data / "train_gen-00000-of-00001.parquet", ULTRACHAT_TEST * 3)
    write_jsonl(tmp_path / "ultrachat_200k" / ".cache" / "junk.jsonl", [{"not": "data"}])
    source = source_for({"kind": "ultrachat", "path": str(tmp_path / "ultrachat_200k")})
    assert len(source.examples("demonstrations")) == 4
    assert [d["response"] for d in source.examples("heldout_demonstrations")] == ["Yes."]


def test_save_to_disk_dataset_dict_and_max_examples(tmp_path):
    import datasets

    folder = tmp_path / "uf"
    datasets.DatasetDict({
        "train_prefs": datasets.Dataset.from_list(ULTRAFEEDBACK),
        "test_prefs": datasets.Dataset.from_list(ULTRAFEEDBACK_TEST),
    }).save_to_disk(str(folder))
    source = source_for({"kind": "ultrafeedback", "path": str(folder), "max_examples": 2})
    pairs = source.examples("preferences")
    assert len(pairs) == 2 and pairs[0]["origin"] == f"{folder}[train_prefs], row 0"
    assert len(source.examples("heldout_pairs")) == 1


def test_hub_is_asked_for_the_configured_splits(monkeypatch):
    import datasets

    asked = []

    def fake_load_dataset(name, split):
        asked.append((name, split))
        return datasets.Dataset.from_list(ULTRACHAT if split == "train_sft" else ULTRACHAT_TEST)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = source_for(compose_config(["data=ultrachat"]).data)
    assert len(source.examples("demonstrations")) == 4
    assert len(source.examples("heldout_demonstrations")) == 1
    assert asked == [("HuggingFaceH4/ultrachat_200k", "train_sft"), ("HuggingFaceH4/ultrachat_200k", "test_sft")]


def test_unreachable_hub_says_to_set_data_path(monkeypatch):
    import datasets

    def offline(name, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"ultrafeedback_binarized\[train_prefs\].*data.path"):
        source_for({"kind": "ultrafeedback"}).examples("preferences")


def test_paper_data_configs_pair_ultrachat_with_ultrafeedback(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", ULTRACHAT)
    prefs = write_parquet(tmp_path / "prefs.parquet", ULTRAFEEDBACK)
    cfg = compose_config(["data=ultrachat", f"data.path={chat}", f"data.preferences_from.path={prefs}"])
    validate(cfg)
    source = source_for(cfg.data)
    assert len(source.examples("demonstrations")) == 4 and len(source.examples("preferences")) == 3
    cfg = compose_config(["data=ultrafeedback", f"data.path={prefs}", f"data.demonstrations_from.path={chat}"])
    validate(cfg)
    source = source_for(cfg.data)
    assert len(source.examples("demonstrations")) == 4 and len(source.examples("preferences")) == 3
    # A snapshot folder holds both splits; evaluation prompts come from the held-out pairs.
    write_parquet(tmp_path / "uf" / "data" / "train_prefs-00000-of-00001.parquet", ULTRAFEEDBACK)
    write_parquet(tmp_path / "uf" / "data" / "test_prefs-00000-of-00001.parquet", ULTRAFEEDBACK_TEST)
    cfg = compose_config(["job=eval", "data=ultrachat", f"data.path={chat}",
                          f"data.preferences_from.path={tmp_path / 'uf'}"])
    validate(cfg)
    source = source_for(cfg.data)
    assert [e["reference"] for e in source.examples("eval")] == ["Tokyo (東京)."]
    assert len(source.examples("heldout_pairs")) == 1 and len(source.examples("preferences")) == 3


def test_generic_local_pairs_and_eval_in_alpaca_format(tmp_path):
    pairs = write_parquet(tmp_path / "pairs.parquet", [
        {"prompt": "Say hi", "chosen": "hi", "rejected": "bye"},
        {"prompt": "Grüße?", "chosen": "Grüße!", "rejected": "—"},
    ])
    alpaca = tmp_path / "alpaca_eval.json"
    alpaca.write_text(json.dumps([{"instruction": "Name a city.", "output": "Tokyo", "generator": "gpt4"}]))
    cfg = compose_config(["job=train", "objective=dpo", "data=jsonl", f"data.path={pairs}", "data.examples=preferences",
                          f"+data.eval_from={{kind:jsonl,examples:eval,path:{alpaca}}}"])
    validate(cfg)
    source = source_for(cfg.data)
    assert source.examples("preferences")[1] == {"prompt": "Grüße?", "chosen": "Grüße!", "rejected": "—",
                                                 "origin": f"{pairs}, row 1"}
    assert source.examples("eval")[0]["reference"] == "Tokyo"


# --------------------------------------------------------------------------- bad data

BAD_JSONL = [
    # (rows or raw text, kind, expected message fragment)
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [\n',
     "ultrachat", r"chat.jsonl, line 2: not valid JSON"),
    ([ULTRACHAT[3], {"prompt": "x", "prompt_id": "p"}], "ultrachat",
     r"chat.jsonl, line 2: missing field 'messages' \(a conversation\) or 'prompt' and 'response'"),
    ([{"messages": [msg("user", "a"), msg("assistant", "b"), {"role": "bot", "content": "c"}]}], "ultrachat",
     r"chat.jsonl, line 1: messages\[2\].role must be user/assistant/system, got 'bot'"),
    ([{"messages": [msg("user", "a"), {"role": "assistant", "content": None}]}], "ultrachat",
     r"line 1: messages\[1\].content must be a string, got null"),
    ([{"messages": [msg("user", "a")]}], "ultrachat", r"line 1: messages has no assistant message"),
    ([{"messages": "hello"}], "ultrachat", r"line 1: messages must be a list of messages"),
    ([{"messages": [msg("user", "a"), msg("system", "late"), msg("assistant", "b")]}], "ultrachat",
     r"messages\[1\] is a system message; only the first message may be one"),
    (["just a string"], "ultrachat", r"line 1: expected an object"),
    ([ULTRAFEEDBACK[0], {"chosen": [msg("user", "q"), msg("assistant", "a")]}], "ultrafeedback",
     r"chat.jsonl, line 2: missing field 'rejected'"),
    ([{"chosen": [msg("user", "q"), msg("user", "a")], "rejected": [msg("user", "q"), msg("assistant", "b")]}],
     "ultrafeedback", r"line 1: chosen\[1\].role must be assistant \(the response is the last message\)"),
    ([{"chosen": [msg("user", "q"), msg("assistant", "a")], "rejected": [msg("user", "Q"), msg("assistant", "b")]}],
     "ultrafeedback", r"line 1: chosen and rejected differ at message 0"),
    ([{"prompt": "q", "chosen": "a", "rejected": 3}], "ultrafeedback", r"line 1: rejected must be text, as chosen is"),
]


@pytest.mark.parametrize("content,kind,expected", BAD_JSONL)
def test_bad_jsonl_rows_name_file_line_and_field(tmp_path, content, kind, expected):
    path = tmp_path / "chat.jsonl"
    if isinstance(content, str):
        path.write_text(content)
    else:
        write_jsonl(path, content)
    with pytest.raises(DataError, match=expected):
        source_for({"kind": kind, "path": str(path)}).examples(
            "demonstrations" if kind == "ultrachat" else "preferences")


def test_bad_parquet_row_names_file_and_row_index(tmp_path):
    rows = [ULTRACHAT[3], ULTRACHAT[1], {"prompt": "x", "prompt_id": "x",
                                         "messages": [msg("user", "a"), msg("robot", "b")]}]
    path = write_parquet(tmp_path / "chat.parquet", rows)
    with pytest.raises(DataError, match=r"chat.parquet, row 2: messages\[1\].role must be user/assistant/system"):
        source_for({"kind": "ultrachat", "path": str(path)}).examples("demonstrations")


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="broken.parquet: not a readable Parquet file"):
        source_for({"kind": "ultrafeedback", "path": str(path)}).examples("preferences")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_empty_split_names_the_file(tmp_path, fmt):
    if fmt == "jsonl":
        path = tmp_path / "empty.jsonl"
        path.write_text("\n")
    else:
        path = tmp_path / "empty.parquet"
        pq.write_table(pa.table({"messages": pa.array([], type=pa.list_(pa.struct(
            [("role", pa.string()), ("content", pa.string())])))}), str(path))
    with pytest.raises(DataError, match=rf"{path.name}: no rows; expected demonstrations"):
        source_for({"kind": "ultrachat", "path": str(path)}).examples("demonstrations")


def test_missing_split_in_saved_dataset_lists_the_splits(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ULTRACHAT_TEST)}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"no split 'train_sft'; it has train"):
        source_for({"kind": "ultrachat", "path": str(tmp_path / "d")}).examples("demonstrations")


def test_bad_rows_skip_counts_and_reports(tmp_path, caplog):
    rows = [ULTRACHAT[0], {"messages": [msg("user", "no answer")]}, ULTRACHAT[1], {"oops": 1}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    source = source_for({"kind": "ultrachat", "path": str(path), "bad_rows": "skip"})
    with caplog.at_level("WARNING"):
        demos = source.examples("demonstrations")
    assert len(demos) == 2
    report = source.reports["demonstrations"]
    assert report["rows"] == 4 and report["skipped_rows"] == 2 and "line 2" in report["first_skipped"][0]
    assert "skipped 2 of 4 rows" in caplog.text
    path = write_jsonl(tmp_path / "bad.jsonl", [{"oops": 1}])
    with pytest.raises(DataError, match="bad.jsonl: none of its 1 rows is valid demonstrations"):
        source_for({"kind": "ultrachat", "path": str(path), "bad_rows": "skip"}).examples("demonstrations")


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["data=ultrachat", "data.path=/no/such/chat.jsonl"], "data.path"),
        (["data=ultrachat", "data.preferences_from.path=/no/such/prefs.parquet"], "data.preferences_from.path"),
        (["data=ultrafeedback", "data.path=CSV"], "data.path"),
        (["data=ultrachat", "data.bad_rows=ignore"], "data.bad_rows"),
        (["data=ultrachat", "data.kind=nope"], "data.kind"),
    ],
)
def test_bad_data_config_is_a_one_line_config_error(tmp_path, overrides, key):
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    cfg = compose_config([o.replace("CSV", str(csv)) for o in overrides])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert key in str(info.value) and "\n" not in str(info.value)
