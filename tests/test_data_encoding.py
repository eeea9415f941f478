"""Encoding real-format data with a real (tiny) byte-level BPE tokenizer and a tiny Llama:
labels cover exactly the assistant tokens of every turn, truncation is counted, a training
step runs on SFT and DPO batches, and the tokenizer saved after SFT is the DPO one."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from ibridge.data import DataError, source_for
from ibridge.data.collate import collate_demonstrations, collate_pairs
from ibridge.data.formatting import (
    IGNORE_INDEX,
    EncodeStats,
    TemplateError,
    encode_conversation,
    encode_split,
    prepare_tokenizer,
)
from ibridge.models import load_model, load_tokenizer, save_checkpoint
from ibridge.objectives import build_objective
from ibridge.runtime import Runtime
from ibridge.stages import attach_reference, demonstration_step, preference_step
from ibridge.training import OptimSettings, optimise
from tests.conftest import compose_config
from tests.test_data_sources import (
    NON_ASCII,
    ULTRACHAT,
    ULTRACHAT_TEST,
    ULTRAFEEDBACK,
    msg,
    write_jsonl,
    write_parquet,
)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|pad|>", "<|begin|>", "<|im_start|>", "<|im_end|>"]
CPU = Runtime(device=torch.device("cpu"), precision="fp32", attn_implementation="eager")


def corpus() -> list[str]:
    texts = [NON_ASCII, "system user assistant"]
    for row in ULTRACHAT + ULTRACHAT_TEST:
        texts += [m["content"] for m in row["messages"]]
    for row in ULTRAFEEDBACK:
        texts += [m["content"] for m in row["chosen"] + row["rejected"]]
    return texts


def build_tokenizer(chat_template: str | None = CHATML, pad: bool = True):
    """A byte-level BPE (encodes any text) trained on the test rows, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin|>", eos_token="<|im_end|>",
                                        pad_token="<|pad|>" if pad else None, clean_up_tokenization_spaces=False)
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_model_dir(folder: Path, tokenizer=None) -> Path:
    """A tiny Llama (hidden 16, one layer) with the tokenizer, saved as a Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return save_checkpoint(model, tokenizer, folder)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return SimpleNamespace(
        root=root,
        model=build_model_dir(root / "model"),
        chat=write_jsonl(root / "chat.jsonl", ULTRACHAT),
        chat_test=write_jsonl(root / "chat_test.jsonl", ULTRACHAT_TEST),
        prefs=write_parquet(root / "prefs.parquet", ULTRAFEEDBACK),
    )


def labelled_spans(tokenizer, item) -> list[str]:
    """The decoded runs of consecutive labelled tokens."""
    spans, run = [], []
    for token, label in zip(item["input_ids"], item["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            spans.append(run)
            run = []
    if run:
        spans.append(run)
    return [tokenizer.decode(span) for span in spans]


def test_labels_cover_exactly_every_assistant_turn(files):
    tokenizer = load_tokenizer(files.model)
    demos = source_for({"kind": "ultrachat", "path": str(files.chat)}).examples("demonstrations")
    encoded, stats = encode_split(tokenizer, demos, "demonstrations", max_length=512)
    assert len(encoded) == 4 and stats.truncated == 0
    for example, item in zip(demos, encoded, strict=True):
        kept = example.get("messages") or [*example["prompt"], msg("assistant", example["response"])]
        expected = [m["content"] + "<|im_end|>\n" for m in kept if m["role"] == "assistant"]
        assert labelled_spans(tokenizer, item) == expected
        # the whole sequence is the template's rendering of the conversation (byte-exact, non-ASCII too)
        assert tokenizer.decode(item["input_ids"]) == tokenizer.apply_chat_template(kept, tokenize=False)
    assert labelled_spans(tokenizer, encoded[2]) == ["Greetings, Tokyo 🚀<|im_end|>\n",
                                                     "Bitte schön — どういたしまして.<|im_end|>\n"]


def test_pairs_label_only_the_final_reply(files):
    tokenizer = load_tokenizer(files.model)
    pairs = source_for({"kind": "ultrafeedback", "path": str(files.prefs)}).examples("preferences")
    encoded, _ = encode_split(tokenizer, pairs, "preferences", max_length=512)
    assert labelled_spans(tokenizer, encoded[2]["chosen"]) == ["It is crisp and sweet.<|im_end|>\n"]
    assert labelled_spans(tokenizer, encoded[2]["rejected"]) == ["Because.<|im_end|>\n"]
    assert labelled_spans(tokenizer, encoded[1]["chosen"]) == ["Grüße zurück! 🚀<|im_end|>\n"]
    batch = collate_pairs([{**e, "ref_chosen": 0.0, "ref_rejected": 0.0} for e in encoded], tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 6


def test_too_long_samples_are_truncated_or_skipped_and_counted(files, caplog):
    tokenizer = load_tokenizer(files.model)
    demos = source_for({"kind": "ultrachat", "path": str(files.chat)}).examples("demonstrations")
    lengths = [len(item["input_ids"]) for item in encode_split(tokenizer, demos, "demonstrations", 512)[0]]
    # Cut inside the first answer of the longest conversation, and before any answer of the shortest.
    first_answer = next(i for i, label in enumerate(
        encode_conversation(tokenizer, demos[0]["messages"], 512)["labels"]) if label != IGNORE_INDEX)
    max_length = first_answer + 2
    with caplog.at_level("WARNING"):
        encoded, stats = encode_split(tokenizer, demos, "demonstrations", max_length)
    assert all(len(item["input_ids"]) <= max_length for item in encoded)
    assert stats.truncated == sum(n > max_length for n in lengths) and stats.truncated > 0
    assert stats.skipped == stats.truncated - len([i for i in encoded if len(i["input_ids"]) == max_length])
    assert "truncated" in caplog.text and str(files.chat) in caplog.text
    batch = collate_demonstrations(encoded, tokenizer.pad_token_id)  # the collator never sees a bad item
    assert batch["input_ids"].shape[1] <= max_length
    with pytest.raises(DataError, match=rf"no demonstrations from {files.chat} left after encoding.*max_length=3"):
        encode_split(tokenizer, demos, "demonstrations", 3)


def test_no_template_and_unstable_template_fail_clearly(files):
    demos = source_for({"kind": "ultrachat", "path": str(files.chat)}).examples("demonstrations")
    with pytest.raises(TemplateError, match="no chat template; set model.chat_template"):
        encode_split(build_tokenizer(chat_template=None), demos, "demonstrations", 512)
    # A template that hides earlier answers once the conversation goes on (as reasoning templates do).
    unstable = CHATML.replace("message['content']",
                              "(message['content'] if loop.last or message['role'] != 'assistant' else '...')")
    with pytest.raises(TemplateError, match=rf"{files.chat}, line 1: .*not prefix-stable"):
        encode_split(build_tokenizer(unstable), demos, "demonstrations", 512)


def test_prepare_tokenizer_adds_template_and_pad_and_the_saved_one_is_reused(files, tmp_path):
    model_cfg = OmegaConf.create({"chat_template": CHATML})
    bare = build_tokenizer(chat_template=None, pad=False)
    tokenizer = prepare_tokenizer(bare, model_cfg)
    assert tokenizer.chat_template == CHATML and tokenizer.pad_token == tokenizer.eos_token
    tokenizer.save_pretrained(tmp_path / "sft")
    reloaded = prepare_tokenizer(load_tokenizer(tmp_path / "sft"), OmegaConf.create({"chat_template": "{{ 'x' }}"}))
    assert reloaded.chat_template == CHATML and reloaded.pad_token_id == tokenizer.pad_token_id
    pairs = source_for({"kind": "ultrafeedback", "path": str(files.prefs)}).examples("preferences")
    assert encode_split(reloaded, pairs, "preferences", 512)[0] == encode_split(tokenizer, pairs, "preferences", 512)[0]


@pytest.mark.parametrize("model", ["llama3_8b", "mistral_7b"])
def test_base_model_configs_template_labels_every_assistant_turn(files, model):
    model_cfg = compose_config([f"model={model}"]).model
    assert model_cfg.kind == "hf" and model_cfg.trust_remote_code is False
    tokenizer = prepare_tokenizer(build_tokenizer(chat_template=None, pad=False), model_cfg)
    demos = source_for({"kind": "ultrachat", "path": str(files.chat)}).examples("demonstrations")
    encoded, _ = encode_split(tokenizer, demos, "demonstrations", 512)
    assert tokenizer.decode(encoded[1]["input_ids"]) == (
        "<|begin|><|system|>\nYou are terse.<|im_end|>\n<|user|>\nSay hello.<|im_end|>\n"
        "<|assistant|>\nHello.<|im_end|>\n")
    assert labelled_spans(tokenizer, encoded[0]) == ["Blue.<|im_end|>\n", "Green, like grass.<|im_end|>\n"]


def test_a_token_across_a_turn_boundary_is_labelled_and_counted(files):
    # Replies that start with blank lines: byte-level BPE merges the header's newline into them.
    tokenizer = build_tokenizer()
    tokenizer.backend_tokenizer.add_tokens(["\n\n"])
    reply = "\n\nSure."
    conversation = [msg("user", "hi"), msg("assistant", reply), msg("user", "more"), msg("assistant", "Done.")]
    stats = EncodeStats()
    item = encode_conversation(tokenizer, conversation, 512, stats)
    assert stats.merged == 1
    spans = labelled_spans(tokenizer, item)
    assert spans == ["\n" + reply + "<|im_end|>\n", "Done.<|im_end|>\n"]  # the merged token, header newline and all


def _changed(before: dict, model) -> bool:
    return any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sft_then_dpo_training_steps_on_real_format_data(files, tmp_path):
    torch.manual_seed(0)
    tokenizer = load_tokenizer(files.model)
    pad = tokenizer.pad_token_id
    settings = OptimSettings(lr=1e-2, max_steps=2, batch_size=2, warmup_ratio=0.0, log_every=1)

    demos = source_for({"kind": "ultrachat", "path": str(files.chat)}).examples("demonstrations")
    encoded, _ = encode_split(tokenizer, demos, "demonstrations", 512)
    model = load_model(files.model, CPU)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = optimise(model, encoded, lambda items: collate_demonstrations(items, pad),
                       demonstration_step(build_objective({"name": "sft"})), settings, CPU)
    assert summary.steps == 2 and _changed(before, model)
    sft_dir = save_checkpoint(model, tokenizer, tmp_path / "sft")

    # DPO from the SFT checkpoint, with the tokenizer saved after SFT, unchanged.
    dpo_tokenizer = load_tokenizer(sft_dir)
    assert dpo_tokenizer.chat_template == tokenizer.chat_template
    pairs = source_for({"kind": "ultrafeedback", "path": str(files.prefs)}).examples("preferences")
    encoded, _ = encode_split(dpo_tokenizer, pairs, "preferences", 512)
    ctx = SimpleNamespace(cfg=OmegaConf.create({"model": {"cache_dir": str(tmp_path / "cache")}}), runtime=CPU)
    attach_reference(encoded, "preferences", sft_dir, ctx, pad)
    policy = load_model(sft_dir, CPU)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    logged = []
    optimise(policy, encoded, lambda items: collate_pairs(items, pad),
             preference_step(build_objective({"name": "dpo", "beta": 0.1})), settings, CPU,
             log=lambda metrics, step: logged.append(metrics))
    assert _changed(before, policy)
    assert any("rewards/margins" in m for m in logged)
