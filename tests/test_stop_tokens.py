"""Generation stops where the chat template ends a turn, and samples for the KL come from pi.

Tokenizers follow each real model's *base* convention, where EOS need not be the
template's end-of-turn token: Qwen2.5 base (EOS and pad ``<|endoftext|>``, ChatML
template ending turns with ``<|im_end|>``), Llama-3 base (EOS ``<|end_of_text|>``;
the Zephyr template of conf/model/llama3_8b.yaml, or Llama-3's own template ending
turns with ``<|eot_id|>``), Mistral-7B base (EOS ``</s>``; conf/model/mistral_7b.yaml's
template, or Mistral's ``[INST]`` one) and the toy world's tokenizer.

The model is a one-layer Llama whose attention and MLP add nothing, so the logits
at each position depend on the current token only: the lm_head maps each token of a
chain to the next one. The chain is the template's rendering of a reply followed by
an invented next user turn, so a generator that misses the end of the turn goes on
past it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ibridge.data.end_of_turn import end_of_turn_ids, stop_token_ids
from ibridge.data.formatting import (
    IGNORE_INDEX,
    TemplateError,
    encode_response,
    prepare_tokenizer,
    prompt_ids,
)
from ibridge.evaluation.generate import generate
from ibridge.models import load_model, save_checkpoint
from ibridge.runtime import Runtime
from ibridge.world import build_tokenizer as build_toy_tokenizer
from tests.conftest import compose_config
from tests.test_data_encoding import corpus

CPU = Runtime(device=torch.device("cpu"), precision="fp32", attn_implementation="eager")

# Qwen2.5 base's template, cut to what matters here (no tools): a default system turn, ChatML turns.
QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message['role'] != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Meta-Llama-3-8B-Instruct's template.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Mistral-7B-Instruct-v0.1's template.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def bpe_tokenizer(specials: list[str], template: str | None = None, **named) -> PreTrainedTokenizerFast:
    """A byte-level BPE over the test corpus (as tests/test_data_encoding.py builds one) with these specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus() + ["Sure thing. Tell me more."], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **named)
    if template:
        tokenizer.chat_template = template
    return tokenizer


def qwen25_base():
    return bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], QWEN25,
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def llama3_base(template=None):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return bpe_tokenizer(specials, template, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


def mistral_base(template=None):
    return bpe_tokenizer(["<unk>", "<s>", "</s>"], template, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@dataclass
class Case:
    build: object  # () -> tokenizer in the base model's convention
    model: str  # conf/model/<model>.yaml, whose chat_template applies to a tokenizer without one
    end: str  # the token that ends an assistant turn
    prompt: str = "Hi."
    reply: str = "Sure thing."
    follow: str = "Tell me more."  # the invented next user turn

    def tokenizer(self):
        return prepare_tokenizer(self.build(), compose_config([f"model={self.model}"]).model)


CASES = {
    "qwen2_5_0_5b": Case(qwen25_base, "qwen2_5_0_5b", "<|im_end|>"),
    "llama3_8b": Case(llama3_base, "llama3_8b", "<|end_of_text|>"),
    "llama3_8b+llama3_template": Case(lambda: llama3_base(LLAMA3), "llama3_8b", "<|eot_id|>"),
    "mistral_7b": Case(mistral_base, "mistral_7b", "</s>"),
    "mistral_7b+inst_template": Case(lambda: mistral_base(MISTRAL), "mistral_7b", "</s>"),
    "toy": Case(build_toy_tokenizer, "toy", "<eos>", prompt="sort 3 1 2", reply="1 2 3", follow="sort 2 1"),
}
# Where the base model's EOS is not the token its template ends a turn with.
EOS_IS_NOT_END = ["qwen2_5_0_5b", "llama3_8b+llama3_template"]


@pytest.mark.parametrize("name", CASES)
def test_end_of_turn_is_the_token_sft_labels_after_the_reply(name):
    case = CASES[name]
    tokenizer = case.tokenizer()
    end = tokenizer.convert_tokens_to_ids(case.end)
    assert end_of_turn_ids(tokenizer) == [end]
    assert stop_token_ids(tokenizer) == list(dict.fromkeys([tokenizer.eos_token_id, end]))
    assert (end != tokenizer.eos_token_id) == (name in EOS_IS_NOT_END)
    # The last labelled token that is not whitespace: what SFT teaches the model to say at the end.
    item = encode_response(tokenizer, case.prompt, case.reply, 512)
    labelled = [t for t, label in zip(item["input_ids"], item["labels"], strict=True) if label != IGNORE_INDEX]
    assert [t for t in labelled if tokenizer.decode([t]).strip()][-1] == end


def test_templates_without_an_end_token_fail_clearly():
    with pytest.raises(TemplateError, match="no chat template"):
        end_of_turn_ids(bpe_tokenizer(["<|endoftext|>"], None, eos_token="<|endoftext|>"))
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    with pytest.raises(TemplateError, match=r"ends an assistant turn with '\\n', not with a special token"):
        end_of_turn_ids(bpe_tokenizer(["<|endoftext|>"], plain, eos_token="<|endoftext|>"))
    hidden = "{% for m in messages %}{{ m['role'] + '<|endoftext|>' }}{% endfor %}"
    with pytest.raises(TemplateError, match="does not render an assistant reply verbatim"):
        end_of_turn_ids(bpe_tokenizer(["<|endoftext|>"], hidden, eos_token="<|endoftext|>"))


def chain_model(tokenizer, chain: list[int]) -> LlamaForCausalLM:
    """A model whose most likely next token after chain[i] is chain[i+1], whatever came before.

    Attention and MLP outputs are zero, embeddings one-hot, so the final hidden state
    at a position is its own token's (scaled) one-hot vector; the lm_head reads the
    successor off it. A token seen twice in `chain` keeps its first successor (a loop).
    """
    width = -(-len(tokenizer) // 64) * 64
    config = LlamaConfig(
        vocab_size=width, hidden_size=width, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=width // 64, num_key_value_heads=width // 64, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(width))
        model.lm_head.weight.zero_()
        successors: dict[int, int] = {}
        for current, following in zip(chain, chain[1:], strict=False):
            successors.setdefault(current, following)
        for current, following in successors.items():
            model.lm_head.weight[following, current] = 2.0  # logit ~2 sqrt(width) >= 16 against 0
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def reply_chain(case: Case, tokenizer) -> tuple[list[int], list[int]]:
    """(the chain from the prompt's last token on, the reply's ids up to and including the end of turn)."""
    conversation = [{"role": "user", "content": case.prompt}, {"role": "assistant", "content": case.reply},
                    {"role": "user", "content": case.follow}]
    full = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)["input_ids"]
    head = prompt_ids(tokenizer, case.prompt)
    assert full[: len(head)] == head
    end = full.index(tokenizer.convert_tokens_to_ids(case.end), len(head))
    assert len(full) > end + 2  # an invented next turn follows the end of this one
    return full[len(head) - 1 :], full[len(head) : end + 1]


@pytest.mark.parametrize("name", CASES)
def test_generation_stops_at_the_end_of_the_turn(name):
    case = CASES[name]
    tokenizer = case.tokenizer()
    chain, expected = reply_chain(case, tokenizer)
    model = chain_model(tokenizer, chain)
    prompts = [case.prompt, [{"role": "user", "content": case.follow}], case.prompt]  # two lengths, left-padded
    outputs = generate(model, tokenizer, prompts, CPU, max_new_tokens=len(chain) + 8, batch_size=3)
    assert len(outputs) == len(prompts)  # one response per prompt: an empty list must not pass the loop
    for out in outputs:
        assert out["response_ids"] == expected  # the end-of-turn token included: log pi(y|x) covers stopping
        assert out["text"] == case.reply  # no invented next turn


@pytest.mark.parametrize("name", CASES)
def test_saved_generation_config_stops_a_plain_generate(name, tmp_path):
    case = CASES[name]
    tokenizer = case.tokenizer()
    chain, expected = reply_chain(case, tokenizer)
    folder = save_checkpoint(chain_model(tokenizer, chain), tokenizer, tmp_path / "ckpt")
    saved = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    stops = list(dict.fromkeys([tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(case.end)]))
    assert (saved if isinstance(saved, list) else [saved]) == stops
    model = load_model(folder, CPU)
    prompt = torch.tensor([prompt_ids(tokenizer, case.prompt)])
    output = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=len(chain) + 8)
    assert output[0, prompt.shape[1] :].tolist() == expected


# generation_config.json settings a checkpoint may carry that change what generate() draws or when it stops.
DISTORTING = {
    "do_sample": True, "temperature": 0.3, "top_k": 1, "top_p": 0.3, "min_p": 0.5, "typical_p": 0.2,
    "epsilon_cutoff": 0.1, "eta_cutoff": 0.1, "repetition_penalty": 3.0, "no_repeat_ngram_size": 1,
    "min_new_tokens": 3, "suppress_tokens": [5], "begin_suppress_tokens": [6], "bad_words_ids": [[7]],
    "sequence_bias": [[[8], 5.0]], "renormalize_logits": True, "forced_eos_token_id": 9,
    "exponential_decay_length_penalty": [1, 1.5], "max_time": 1000.0, "return_dict_in_generate": True,
}


def distorted_checkpoint(tmp_path, probs: dict[str, float]):
    """A Qwen2.5-base-style checkpoint whose first reply token has distribution `probs` (about),
    saved with a generation_config.json that sets every distortion in DISTORTING."""
    case = CASES["qwen2_5_0_5b"]
    tokenizer = case.tokenizer()
    chain, _ = reply_chain(case, tokenizer)
    model = chain_model(tokenizer, chain)
    width = model.config.hidden_size
    with torch.no_grad():
        model.lm_head.weight[:, chain[0]] = 0.0
        for token, p in probs.items():
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(token), chain[0]] = (
                (30 + torch.log(torch.tensor(p))) / width**0.5)
    for key, value in DISTORTING.items():
        setattr(model.generation_config, key, value)
    folder = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    assert json.loads((folder / "generation_config.json").read_text())["repetition_penalty"] == 3.0
    return load_model(folder, CPU), tokenizer


@pytest.mark.parametrize("do_sample", [True, False])
def test_no_logits_processor_from_the_checkpoint_is_applied(tmp_path, monkeypatch, do_sample):
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

    model, tokenizer = distorted_checkpoint(tmp_path, {"S": 0.4, "T": 0.3, "H": 0.2, "W": 0.1})
    seen = {}
    processors, criteria = model._get_logits_processor, model._get_stopping_criteria

    def spy_processors(*args, **kwargs):
        seen["processors"] = processors(*args, **kwargs)
        return seen["processors"]

    def spy_criteria(*args, **kwargs):
        seen["criteria"] = criteria(*args, **kwargs)
        return seen["criteria"]

    monkeypatch.setattr(model, "_get_logits_processor", spy_processors)
    monkeypatch.setattr(model, "_get_stopping_criteria", spy_criteria)
    generate(model, tokenizer, ["Hi."], CPU, max_new_tokens=4, batch_size=1, do_sample=do_sample)
    assert list(seen["processors"]) == []
    assert {type(c) for c in seen["criteria"]} == {MaxLengthCriteria, EosTokenCriteria}
    generate(model, tokenizer, ["Hi."], CPU, max_new_tokens=4, batch_size=1, do_sample=True, temperature=0.7)
    assert [type(p).__name__ for p in seen["processors"]] == ["TemperatureLogitsWarper"]


def test_samples_follow_pi_despite_the_checkpoints_generation_config(tmp_path):
    model, tokenizer = distorted_checkpoint(tmp_path, {"S": 0.4, "T": 0.3, "H": 0.2, "W": 0.1})
    prompt = torch.tensor([prompt_ids(tokenizer, "Hi.")])
    with torch.no_grad():
        pi = torch.softmax(model(input_ids=prompt).logits[0, -1].float(), dim=-1)  # the first reply token's law
    n = 4000
    torch.manual_seed(0)
    samples = generate(model, tokenizer, ["Hi."] * n, CPU, max_new_tokens=1, batch_size=n, do_sample=True)
    counts = torch.bincount(torch.tensor([s["response_ids"][0] for s in samples]), minlength=len(pi))
    assert sorted(round(float(p), 3) for p in pi if p > 1e-3) == [0.1, 0.2, 0.3, 0.4]
    # Each frequency within 5 standard errors (<= 0.039) of its probability under pi.
    assert torch.allclose(counts[: len(pi)] / n, pi, atol=5 * (0.25 / n) ** 0.5)
