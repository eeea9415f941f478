"""Chat formatting: examples → token ids with the loss on assistant tokens only.

The chat template comes from the tokenizer, so the toy model and a real model
share this code (a base model without one gets ``model.chat_template`` through
`prepare_tokenizer`). Labels follow the Hugging Face convention: ``labels[t] =
input_ids[t]`` on assistant tokens, -100 elsewhere; the shift by one happens in
``ibridge.objectives.logprobs``.

How assistant tokens are found: the conversation is rendered whole, and for
each assistant turn ``i`` the template also renders ``messages[:i]`` with the
generation header (where the turn starts) and ``messages[:i+1]`` (where it
ends). Both renderings must be text prefixes of the whole: a template that
renders earlier turns differently once later ones follow (one that drops earlier
reasoning, say) is refused with `TemplateError`, since prompt and response
tokens could then not be told apart, and a model would see at generation time a
prompt it was never trained on. Normally each rendering also tokenizes to a
prefix of the whole; when a token spans the boundary instead (a reply starting
with blank lines after a header ending in one, under a tokenizer that merges
newlines), the boundary moves to the start of that token, which is labelled,
and the example is counted in ``EncodeStats.merged``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ibridge.data.schema import DataError

IGNORE_INDEX = -100
# Truncated or skipped examples named in the log, at most.
NAMED_EXAMPLES = 3

log = logging.getLogger(__name__)


class TemplateError(ValueError):
    """The tokenizer's chat template is missing or cannot separate prompt from response tokens."""


def as_messages(prompt) -> list[dict]:
    """A prompt given as text is one user turn; a list is taken as chat messages."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            f"the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template; set "
            f"model.chat_template (conf/model/llama3_8b.yaml has one for base models)"
        )
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja's TemplateError, or a template's own raise_exception
        raise TemplateError(f"the chat template cannot render this conversation: {err}") from None


def prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of the prompt followed by the assistant's generation header."""
    return _ids(tokenizer, _render(tokenizer, as_messages(prompt), add_generation_prompt=True))


def prepare_tokenizer(tokenizer, model_cfg=None):
    """Give a tokenizer what training needs: a chat template and a pad token (in place; returned).

    ``model_cfg.chat_template`` applies only to a tokenizer *without* a template (a
    base model's); a tokenizer that has one, such as any checkpoint ibridge saved,
    is used unchanged, so the tokenizer saved after SFT is the DPO stage's. A
    missing pad token becomes the EOS token (padding is masked out of every loss).
    Both settings are saved with the checkpoint.
    """
    template = model_cfg.get("chat_template") if model_cfg is not None else None
    if not getattr(tokenizer, "chat_template", None) and template:
        tokenizer.chat_template = str(template)
        log.info("tokenizer %s: no chat template; using model.chat_template", tokenizer.name_or_path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise TemplateError(f"tokenizer {tokenizer.name_or_path}: neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer %s: no pad token; padding with EOS %r (masked out of every loss)",
                 tokenizer.name_or_path, tokenizer.eos_token)
    return tokenizer


@dataclass
class EncodeStats:
    """Counts of what encoding had to change, reported once per split.

    ``examples`` counts encoded sequences (two per preference pair); ``truncated``
    those longer than ``max_length`` (cut at the right); ``skipped`` those with no
    response token left after the cut (their example is dropped).
    """

    truncated: int = 0
    skipped: int = 0
    examples: int = 0
    merged: int = 0  # turn boundaries inside a token (see the module docstring)
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.notes) < NAMED_EXAMPLES:
            self.notes.append(text)

    def summary(self, kind: str, kept: int, max_length: int) -> str:
        text = (f"{kind}: {self.truncated} of {self.examples} sequences longer than model.max_length={max_length} "
                f"were truncated; {self.skipped} had no response token left and were skipped; {kept} examples kept")
        if self.merged:
            text += f"; {self.merged} turn boundaries fell inside a token (that token is labelled)"
        return text + (f" (e.g. {'; '.join(self.notes)})" if self.notes else "")


def _boundary(full: list[int], part: list[int], full_text: str, part_text: str, what: str,
              stats: EncodeStats | None) -> int:
    """Where the rendering `part` ends inside `full`, in tokens."""
    if full[: len(part)] == part:
        return len(part)
    if not full_text.startswith(part_text):
        raise TemplateError(
            f"the tokenizer's chat template is not prefix-stable: {what} is not rendered as a prefix of the "
            f"whole conversation, so response tokens cannot be told from prompt tokens; use a template that "
            f"renders earlier turns unchanged (model.chat_template applies to tokenizers without one)"
        )
    # The text is a prefix but a token spans the boundary: cut before that token.
    common = next((k for k, (a, b) in enumerate(zip(full, part, strict=False)) if a != b), min(len(full), len(part)))
    if stats is not None:
        stats.merged += 1
    return common


def encode_messages(tokenizer, messages: list[dict], max_length: int, stats: EncodeStats | None = None,
                    train_on: str = "all"):
    """``{"input_ids", "labels"}`` for a conversation ending with an assistant turn, or None.

    ``train_on="all"`` labels the tokens of every assistant turn (from after its
    generation header to the end of the turn, end-of-turn tokens included);
    ``"last"`` only the final one. A sequence longer than ``max_length`` is cut at
    the right and counted; if no labelled token is left it is skipped (None).
    """
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns or turns[-1] != len(messages) - 1:
        raise DataError("a conversation to encode must end with an assistant message")
    if train_on == "last":
        turns = turns[-1:]
    texts = [_render(tokenizer, messages, add_generation_prompt=False)]
    for i in turns:
        texts.append(_render(tokenizer, messages[:i], add_generation_prompt=True))
        if i != len(messages) - 1:
            texts.append(_render(tokenizer, messages[: i + 1], add_generation_prompt=False))
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    full = encoded[0]
    parts = iter(zip(encoded[1:], texts[1:], strict=True))
    labels = [IGNORE_INDEX] * len(full)
    for i in turns:
        head, head_text = next(parts)
        start = _boundary(full, head, texts[0], head_text,
                          f"the prompt before message {i} (with the generation header)", stats)
        end = len(full)
        if i != len(messages) - 1:
            upto, upto_text = next(parts)
            end = _boundary(full, upto, texts[0], upto_text, f"the conversation up to message {i}", stats)
        if end < start:
            raise TemplateError(f"the chat template renders message {i} shorter than its generation header")
        labels[start:end] = full[start:end]
    if stats is not None:
        stats.examples += 1
    if len(full) > max_length:
        full, labels = full[:max_length], labels[:max_length]
        if stats is not None:
            stats.truncated += 1
        if all(label == IGNORE_INDEX for label in labels):
            if stats is not None:
                stats.skipped += 1
            return None
    return {"input_ids": full, "labels": labels}


def encode_response(tokenizer, prompt, response: str, max_length: int, stats: EncodeStats | None = None):
    """``{"input_ids", "labels"}`` for one prompt/response, or None if nothing of the response fits.

    Only the response is labelled, even when the prompt holds earlier assistant
    turns (a preference pair's shared history). A sequence longer than
    ``max_length`` is cut at the right (the prompt is kept whole) and counted in ``stats``.
    """
    conversation = as_messages(prompt) + [{"role": "assistant", "content": response}]
    return encode_messages(tokenizer, conversation, max_length, stats, train_on="last")


def encode_conversation(tokenizer, messages: list[dict], max_length: int, stats: EncodeStats | None = None):
    """A multi-turn demonstration with every assistant turn labelled (see `encode_messages`)."""
    return encode_messages(tokenizer, messages, max_length, stats, train_on="all")


def _encode_demonstration(tokenizer, example: dict, max_length: int, stats: EncodeStats):
    if example.get("messages"):
        return encode_conversation(tokenizer, example["messages"], max_length, stats)
    return encode_response(tokenizer, example["prompt"], example["response"], max_length, stats)


def _origin_file(origin: str) -> str:
    return origin.rsplit(", ", 1)[0]


def encode_split(tokenizer, examples: list[dict], kind: str, max_length: int):
    """Encode a split of demonstrations or preference pairs; returns (encoded, stats).

    Truncations and skips are counted, logged once, and returned in ``stats``.
    A template that cannot render an example fails naming the example's origin;
    a split with nothing left fails naming its file.
    """
    stats = EncodeStats()
    encoded = []
    for example in examples:
        origin = example.get("origin")
        before = (stats.truncated, stats.skipped)
        try:
            if kind in ("demonstrations", "heldout_demonstrations"):
                item = _encode_demonstration(tokenizer, example, max_length, stats)
            else:
                chosen = encode_response(tokenizer, example["prompt"], example["chosen"], max_length, stats)
                rejected = encode_response(tokenizer, example["prompt"], example["rejected"], max_length, stats)
                item = None if chosen is None or rejected is None else {"chosen": chosen, "rejected": rejected}
        except (TemplateError, DataError) as err:
            if origin:
                raise type(err)(f"{origin}: {err}") from None
            raise
        if origin and (stats.truncated, stats.skipped) != before:
            stats.note(f"{origin} {'skipped' if item is None else 'truncated'}")
        if item is not None:
            encoded.append(item)
    if stats.truncated or stats.merged:
        log.warning(stats.summary(kind, len(encoded), max_length))
    if not encoded:
        files = sorted({_origin_file(e["origin"]) for e in examples if e.get("origin")})
        where = f" from {', '.join(files)}" if files else ""
        if not examples:
            raise DataError(f"no {kind}{where} to encode: the split is empty")
        raise DataError(
            f"no {kind}{where} left after encoding: all {len(examples)} have no response token within "
            f"model.max_length={max_length}"
        )
    return encoded, stats
