"""Where the chat template ends an assistant turn: the token(s) generation must stop at.

A base model's EOS is often not the token its chat template ends a turn with:
Qwen2.5 base has ``eos_token = <|endoftext|>`` while its ChatML template closes
every turn with ``<|im_end|>``. SFT labels the template's rendering of a reply,
end-of-turn token included (`ibridge.data.formatting.encode_messages`), so a
trained model says ``<|im_end|>``; a generator that stops only at EOS runs on
and invents the next turn. The end-of-turn token is therefore read off the
template itself: a one-turn conversation is rendered with a sentinel reply, and
the first non-whitespace token after the sentinel is the one that ends the turn
(``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama-3's template, EOS for the
Zephyr template of conf/model/llama3_8b.yaml and mistral_7b.yaml, ``<eos>`` for
the toy world's).
"""

from __future__ import annotations

from ibridge.data.formatting import TemplateError, _ids, _render

# A reply no template rewrites (no whitespace to trim, no markup to escape).
SENTINEL = "ibridgeSentinelReply"


def _is_marker(tokenizer, token: int) -> bool:
    """A special or added token: one the template writes as a unit, not text."""
    return token in tokenizer.all_special_ids or token in tokenizer.added_tokens_decoder


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token that the chat template puts right after an assistant reply, as a one-element list.

    Raises `TemplateError` when the tokenizer has no template, the template cannot
    render a user/assistant exchange or does not render the reply verbatim, or the
    turn ends with nothing or with plain text (no single token to stop on).
    """
    name = getattr(tokenizer, "name_or_path", "?")
    messages = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": SENTINEL}]
    text = _render(tokenizer, messages, add_generation_prompt=False)
    at = text.rfind(SENTINEL)
    if at < 0:
        raise TemplateError(f"tokenizer {name}: the chat template does not render an assistant reply verbatim "
                            f"(rendered {text!r}), so where a turn ends cannot be read off it")
    tail = text[at + len(SENTINEL):]
    for token in _ids(tokenizer, tail):
        if not tokenizer.decode([token]).strip():
            continue  # a space or newline between the reply and its end marker
        if not _is_marker(tokenizer, token):
            break
        return [token]
    raise TemplateError(
        f"tokenizer {name}: the chat template ends an assistant turn with {tail!r}, not with a special token, "
        f"so generation has no token to stop at; use a template that ends each assistant turn with one "
        f"(e.g. eos_token; model.chat_template applies to tokenizers without a template)"
    )


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and the template's end-of-turn token, without duplicates: generation stops at any of them."""
    stops = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return stops + [token for token in end_of_turn_ids(tokenizer) if token not in stops]
