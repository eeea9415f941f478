"""Templates that end a turn with text, not one token: generation stops at that text.

An Alpaca-style template closes a reply with a blank line; ChatML on a tokenizer without
``<|im_end|>`` as a token closes it with several plain tokens. There is no single stop token,
so `generate` stops at the text (transformers' ``stop_strings``) and cuts ``response_ids`` after
the token that completes it. The chain model of tests/test_stop_tokens.py would go on into an
invented next turn if generation missed the end.
"""

from __future__ import annotations

import pytest

from ibridge.data.end_of_turn import cut_at_stop, end_of_turn_ids, generation_stops, turn_end
from ibridge.data.formatting import IGNORE_INDEX, TemplateError, encode_response, prompt_ids
from ibridge.evaluation.generate import generate
from tests.test_stop_tokens import CPU, QWEN25, bpe_tokenizer, chain_model

ALPACA = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Response:\\n' + m['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)


def _chatml_without_im_end():
    """Qwen2.5's template on a tokenizer that has no <|im_end|> token; BPE-trained on ChatML text
    so that "<|im_end|>" is a few plain tokens, none twice (the chain model follows one token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.test_data_encoding import corpus

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus() + ["Sure thing.<|im_end|>\n<|im_start|>user\nTell me more.<|im_end|>\n"] * 20,
                                trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                        eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = QWEN25
    return tokenizer


CASES = {
    # (tokenizer, the end-of-turn text)
    "alpaca": (lambda: bpe_tokenizer(["<|endoftext|>"], ALPACA, eos_token="<|endoftext|>",
                                     pad_token="<|endoftext|>"), "\n\n"),
    "chatml-without-im_end-token": (_chatml_without_im_end, "<|im_end|>"),
}
PROMPT, REPLY, FOLLOW = "Hi.", "Sure thing.", "Tell me more."


@pytest.mark.parametrize("name", CASES)
def test_a_text_end_of_turn_is_found_and_sft_labels_it(name):
    build, end = CASES[name]
    tokenizer = build()
    assert turn_end(tokenizer) == ([], end)
    assert generation_stops(tokenizer) == ([tokenizer.eos_token_id], [end])
    with pytest.raises(TemplateError, match="not with a special token"):
        end_of_turn_ids(tokenizer)  # no single token: a plain generate() cannot stop there
    item = encode_response(tokenizer, PROMPT, REPLY, 512)
    labelled = [t for t, label in zip(item["input_ids"], item["labels"], strict=True) if label != IGNORE_INDEX]
    assert end in tokenizer.decode(labelled)  # SFT teaches the model to say it


def _chain(tokenizer) -> tuple[list[int], list[int]]:
    """(the chain from the prompt's last token on: reply, end-of-turn text, an invented next turn;
    the expected response ids: up to the token that completes the end-of-turn text)."""
    _, [end] = generation_stops(tokenizer)
    conversation = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": REPLY},
                    {"role": "user", "content": FOLLOW}]
    full = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)["input_ids"]
    head = prompt_ids(tokenizer, PROMPT)
    assert full[: len(head)] == head
    done = next(t for t in range(len(head), len(full)) if end in tokenizer.decode(full[len(head): t + 1]))
    assert len(full) > done + 2  # an invented next turn follows
    return full[len(head) - 1:], full[len(head): done + 1]


def test_generation_stops_at_the_end_of_turn_text():
    # The Alpaca case cannot run on the chain model: its "\n" before the reply and in the blank
    # line are one token with one successor. cut_at_stop's cases below cover a whitespace stop.
    tokenizer = CASES["chatml-without-im_end-token"][0]()
    chain, expected = _chain(tokenizer)
    model = chain_model(tokenizer, chain)
    prompts = [PROMPT, PROMPT]
    outputs = generate(model, tokenizer, prompts, CPU, max_new_tokens=len(chain) + 8, batch_size=2)
    assert len(outputs) == len(prompts)
    for out in outputs:
        assert out["response_ids"] == expected  # the end-of-turn text included: log pi(y|x) covers stopping
        assert out["text"] == REPLY  # no end-of-turn text, no invented next turn


def test_cut_at_stop_by_hand():
    tokenizer = CASES["chatml-without-im_end-token"][0]()
    ids = tokenizer("Sure thing.<|im_end|>\n<|im_start|>user", add_special_tokens=False)["input_ids"]
    tokens, text = cut_at_stop(tokenizer, ids, [tokenizer.eos_token_id], ["<|im_end|>"])
    assert text == "Sure thing." and tokenizer.decode(tokens).endswith("<|im_end|>")
    assert "<|im_end|>" not in tokenizer.decode(tokens[:-1])  # cut at the token that completes it
    # a stop token before the text wins; a row that never stops is kept whole
    eos = tokenizer.eos_token_id
    assert cut_at_stop(tokenizer, [ids[0], eos, *ids[1:]], [eos], ["<|im_end|>"])[0] == [ids[0], eos]
    plain = tokenizer("Sure thing.", add_special_tokens=False)["input_ids"]
    assert cut_at_stop(tokenizer, plain, [eos], ["<|im_end|>"]) == (plain, "Sure thing.")
    alpaca = CASES["alpaca"][0]()
    ids = alpaca("Sure thing.\n\n### Instruction:\nTell me more.", add_special_tokens=False)["input_ids"]
    tokens, text = cut_at_stop(alpaca, ids, [alpaca.eos_token_id], ["\n\n"])
    assert text == "Sure thing." and alpaca.decode(tokens).endswith("\n\n") and "\n\n" not in alpaca.decode(tokens[:-1])
