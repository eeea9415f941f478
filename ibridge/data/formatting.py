"""Chat formatting: examples → token ids with the loss on assistant tokens only.

The chat template comes from the tokenizer, so the toy model and a real model
share this code. Labels follow the Hugging Face convention: ``labels[t] =
input_ids[t]`` on response tokens, -100 elsewhere; the shift by one happens in
``ibridge.objectives.logprobs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE_INDEX = -100


def as_messages(prompt) -> list[dict]:
    """A prompt given as text is one user turn; a list is taken as chat messages."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of the prompt followed by the assistant's generation header."""
    text = tokenizer.apply_chat_template(as_messages(prompt), tokenize=False, add_generation_prompt=True)
    return _ids(tokenizer, text)


@dataclass
class EncodeStats:
    """Counts of what encoding had to change, reported once per split."""

    truncated: int = 0
    skipped: int = 0
    examples: int = 0
    notes: list[str] = field(default_factory=list)


def encode_response(tokenizer, prompt, response: str, max_length: int, stats: EncodeStats | None = None):
    """``{"input_ids", "labels"}`` for one prompt/response, or None if nothing of the response fits.

    A sequence longer than ``max_length`` is cut at the right (the prompt is kept
    whole) and counted in ``stats``.
    """
    head = prompt_ids(tokenizer, prompt)
    conversation = as_messages(prompt) + [{"role": "assistant", "content": response}]
    full = _ids(tokenizer, tokenizer.apply_chat_template(conversation, tokenize=False))
    if full[: len(head)] != head:
        raise ValueError(
            "the tokenizer's chat template renders the prompt differently with and without the "
            "assistant turn; cannot tell response tokens from prompt tokens"
        )
    if stats is not None:
        stats.examples += 1
    if len(full) > max_length:
        if stats is not None:
            stats.truncated += 1
        full = full[:max_length]
        if len(full) <= len(head):
            if stats is not None:
                stats.skipped += 1
            return None
    labels = [IGNORE_INDEX] * len(head) + full[len(head):]
    return {"input_ids": full, "labels": labels}


def encode_split(tokenizer, examples: list[dict], kind: str, max_length: int):
    """Encode a split of demonstrations or preference pairs; returns (encoded, stats)."""
    stats = EncodeStats()
    encoded = []
    for example in examples:
        if kind == "demonstrations":
            item = encode_response(tokenizer, example["prompt"], example["response"], max_length, stats)
            if item is not None:
                encoded.append(item)
        else:
            chosen = encode_response(tokenizer, example["prompt"], example["chosen"], max_length, stats)
            rejected = encode_response(tokenizer, example["prompt"], example["rejected"], max_length, stats)
            if chosen is not None and rejected is not None:
                encoded.append({"chosen": chosen, "rejected": rejected})
    if not encoded:
        raise ValueError(f"no {kind} left after encoding (all {len(examples)} longer than max_length={max_length}?)")
    return encoded, stats
