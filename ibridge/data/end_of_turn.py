"""Where the chat template ends an assistant turn: the token or text generation must stop at.

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
the toy world's). A template that ends a turn with plain text instead (an Alpaca-style
blank line, or ChatML on a tokenizer without ``<|im_end|>`` as a token) has no such token;
generation then stops at that text (``stop_strings``) and the response is cut after it.
"""

from __future__ import annotations

from ibridge.data.formatting import TemplateError, _ids, _render

# A reply no template rewrites (no whitespace to trim, no markup to escape).
SENTINEL = "ibridgeSentinelReply"


def _is_marker(tokenizer, token: int) -> bool:
    """A special or added token: one the template writes as a unit, not text."""
    return token in tokenizer.all_special_ids or token in tokenizer.added_tokens_decoder


def turn_end(tokenizer) -> tuple[list[int], str | None]:
    """How the chat template ends an assistant turn: ``([token], None)`` for a marker token (a
    special or added token), or ``([], text)`` when it ends with plain text or several tokens
    (an Alpaca-style ``"\n\n"``, or ChatML's ``<|im_end|>`` on a tokenizer that does not have it
    as a token): generation then stops at that text (``stop_strings``).

    Raises `TemplateError` when the tokenizer has no template, the template cannot render a
    user/assistant exchange or does not render the reply verbatim, or the turn ends with nothing.
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
        if _is_marker(tokenizer, token):
            return [token], None
        break
    if not tail:
        raise TemplateError(f"tokenizer {name}: the chat template ends an assistant turn with nothing, so "
                            f"generation has nothing to stop at; use a template that ends each assistant turn")
    # Plain text: its visible part (whitespace before and after is how the next turn is laid out),
    # or, when the turn ends with whitespace alone (Alpaca's blank line), that whitespace.
    return [], tail.strip() or tail


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token that the chat template puts right after an assistant reply, as a one-element list.

    Raises `TemplateError` where :func:`turn_end` does, and when the turn ends with plain text
    (no single token to stop on: generation uses :func:`stop_strings` there).
    """
    ids, text = turn_end(tokenizer)
    if text is not None:
        name = getattr(tokenizer, "name_or_path", "?")
        raise TemplateError(
            f"tokenizer {name}: the chat template ends an assistant turn with {text!r}, not with a special token, "
            f"so generation has no token to stop at (it stops at that text instead); a template that ends each "
            f"assistant turn with one (e.g. eos_token; model.chat_template applies to tokenizers without a "
            f"template) also lets a plain generate() stop"
        )
    return ids


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and the template's end-of-turn token, without duplicates: generation stops at any of them.
    Raises `TemplateError` as :func:`end_of_turn_ids` (callers that can stop at text use
    :func:`generation_stops`)."""
    stops = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return stops + [token for token in end_of_turn_ids(tokenizer) if token not in stops]


def generation_stops(tokenizer) -> tuple[list[int], list[str]]:
    """``(token ids, stop strings)`` to stop generation at: EOS and the end-of-turn token, or EOS
    and the end-of-turn text where the template ends a turn with text (:func:`turn_end`)."""
    ids, text = turn_end(tokenizer)
    stops = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return stops + [token for token in ids if token not in stops], [] if text is None else [text]


def cut_at_stop(tokenizer, tokens: list[int], stop_ids: list[int], stop_texts: list[str]) -> tuple[list[int], str]:
    """A generated row cut where it ends its turn: ``(response ids, reply text)``.

    The response ids stop at and include the first stop token, or the token that completes the
    first stop string (so that log pi(y|x) covers the decision to stop); the reply text is what
    comes before it. A row that never stopped is returned whole.
    """
    end = next((t for t, token in enumerate(tokens) if token in stop_ids), None)
    if stop_texts:
        # The first token after which the decoded response holds a stop string, before any stop token.
        limit = len(tokens) if end is None else end
        for t in range(limit):
            text = tokenizer.decode(tokens[: t + 1], skip_special_tokens=True)
            at = min((text.find(s) for s in stop_texts if s in text), default=-1)
            if at >= 0:
                return tokens[: t + 1], text[:at].strip()
    if end is None:
        return tokens, tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return tokens[: end + 1], tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()
