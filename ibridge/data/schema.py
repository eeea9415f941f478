"""Row schemas: one raw row (a dict from a file or the hub) → one example dict.

Every check names where the row came from (``origin``: ``file, line N`` for
JSONL, ``file, row N`` for Parquet and ``datasets`` rows, 0-based as pandas and
``datasets`` show them), the field, and what was expected, e.g.
``data.jsonl, line 3: messages[2].role must be user/assistant/system, got 'bot'``.

Accepted rows (docs/real_setting.md has the full account; TRL prompt-completion, ShareGPT
and Alpaca rows are converted to these first, in :mod:`ibridge.data.formats`):

- demonstrations: ``{"messages": [{"role", "content"}, ...]}`` (UltraChat-200k), or
  ``{"prompt": str | messages, "response": str}``;
- preferences: ``{"chosen": messages, "rejected": messages}`` whose last message is
  the assistant's and whose earlier messages agree (UltraFeedback binarized; with a
  ``prompt`` list of messages before them: TRL's explicit-prompt form), or
  ``{"prompt": str | messages, "chosen": str, "rejected": str}``;
- eval: ``{"prompt": str | messages, "reference": str}``, or AlpacaEval's
  ``{"instruction", "output"}``.
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data file, split or row is unusable; the message names the file and row."""


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def check_messages(value, origin: str, field: str) -> list[dict]:
    """A list of ``{"role", "content"}`` chat messages, or DataError naming the bad element."""
    if not isinstance(value, (list, tuple)):
        raise DataError(
            f"{origin}: {field} must be a list of messages {{role, content}}, got {_type_name(value)}"
        )
    if not value:
        raise DataError(f"{origin}: {field} is an empty list; expected at least one message")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{origin}: {field}[{i}] must be an object with role and content, got {_type_name(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"{origin}: {field}[{i}].role must be user/assistant/system, got {role!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise DataError(f"{origin}: {field}[{i}].content must be a string, got {_type_name(content)}")
        if role == "system" and i != 0:
            raise DataError(f"{origin}: {field}[{i}] is a system message; only the first message may be one")
        messages.append({"role": role, "content": content})
    return messages


def _check_prompt(value, origin: str, field: str = "prompt"):
    """A prompt: text (one user turn) or messages ending with the user's turn."""
    if isinstance(value, str):
        return value
    messages = check_messages(value, origin, field)
    last = len(messages) - 1
    if messages[last]["role"] != "user":
        raise DataError(f"{origin}: {field}[{last}].role must be user (a prompt ends with the user's turn), "
                        f"got {messages[last]['role']!r}")
    return messages


def _text(row: dict, key: str, origin: str) -> str:
    if key not in row or row[key] is None:
        raise DataError(f"{origin}: missing field {key!r}")
    if not isinstance(row[key], str):
        raise DataError(f"{origin}: {key} must be a string, got {_type_name(row[key])}")
    return row[key]


def _as_row(row, origin: str, expected: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{origin}: expected an object with {expected}, got {_type_name(row)}")
    return row


def parse_demonstration(row, origin: str) -> dict:
    """``{"prompt", "response"}``, plus ``"messages"`` when more than one assistant turn is trained on."""
    row = _as_row(row, origin, "field 'messages' (or 'prompt' and 'response')")
    if row.get("messages") is not None:
        messages = check_messages(row["messages"], origin, "messages")
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not assistant:
            raise DataError(f"{origin}: messages has no assistant message; nothing to train on")
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first_user is None or first_user > assistant[0]:
            raise DataError(f"{origin}: messages[{assistant[0]}] is an assistant message with no user message before it")
        # Turns after the last assistant message carry no loss: drop them.
        messages = messages[: assistant[-1] + 1]
        example = {"prompt": messages[:-1], "response": messages[-1]["content"]}
        if len(assistant) > 1:
            example["messages"] = messages
        return example
    if row.get("response") is None:  # UltraChat rows have a text `prompt` too: `messages` is what is missing
        raise DataError(f"{origin}: missing field 'messages' (a conversation) or 'prompt' and 'response'")
    if row.get("prompt") is None:
        raise DataError(f"{origin}: missing field 'prompt'")
    return {"prompt": _check_prompt(row["prompt"], origin), "response": _text(row, "response", origin)}


def parse_pair(row, origin: str) -> dict:
    """``{"prompt", "chosen", "rejected"}`` with chosen/rejected the final assistant replies as text."""
    row = _as_row(row, origin, "fields 'chosen' and 'rejected'")
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise DataError(f"{origin}: missing field {key!r}")
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, str) or isinstance(rejected, str):
        for key, other in (("chosen", "rejected"), ("rejected", "chosen")):
            if not isinstance(row[key], str):
                raise DataError(f"{origin}: {key} must be text, as {other} is (or both lists of messages), "
                                f"got {_type_name(row[key])}")
        if row.get("prompt") is None:
            raise DataError(f"{origin}: missing field 'prompt' (chosen and rejected are plain text)")
        return {"prompt": _check_prompt(row["prompt"], origin), "chosen": chosen, "rejected": rejected}
    # UltraFeedback binarized: two conversations sharing every message but the last.
    sides = {key: check_messages(row[key], origin, key) for key in ("chosen", "rejected")}
    for key, messages in sides.items():
        last = len(messages) - 1
        if messages[last]["role"] != "assistant":
            raise DataError(f"{origin}: {key}[{last}].role must be assistant (the response is the last message), "
                            f"got {messages[last]['role']!r}")
    head_c, head_r = sides["chosen"][:-1], sides["rejected"][:-1]
    if head_c != head_r:
        at = next((i for i, (a, b) in enumerate(zip(head_c, head_r, strict=False)) if a != b), min(len(head_c), len(head_r)))
        raise DataError(f"{origin}: chosen and rejected differ at message {at}, before their last message; "
                        f"expected the same prompt messages in both")
    explicit = row.get("prompt")
    if isinstance(explicit, (list, tuple)):
        # TRL's conversational preference with an explicit prompt: the prompt's messages, then
        # any messages chosen and rejected share before their replies.
        prompt = _check_prompt(check_messages(explicit, origin, "prompt") + head_c, origin,
                               "prompt" if not head_c else "chosen")
    elif head_c:
        prompt = _check_prompt(head_c, origin, "chosen")
    elif isinstance(explicit, str):
        prompt = explicit
    else:
        raise DataError(f"{origin}: chosen holds only the assistant's reply and there is no field 'prompt' "
                        f"(text, or a list of messages ending with the user's turn)")
    return {"prompt": prompt, "chosen": sides["chosen"][-1]["content"], "rejected": sides["rejected"][-1]["content"]}


def parse_eval(row, origin: str) -> dict:
    """``{"prompt", "reference"}``; AlpacaEval's ``instruction``/``output`` are accepted too."""
    row = _as_row(row, origin, "fields 'prompt' and 'reference' (or AlpacaEval's 'instruction' and 'output')")
    if row.get("prompt") is None and row.get("instruction") is not None:
        return {"prompt": _text(row, "instruction", origin), "reference": _text(row, "output", origin)}
    if row.get("prompt") is None:
        raise DataError(f"{origin}: missing field 'prompt' (or AlpacaEval's 'instruction')")
    return {"prompt": _check_prompt(row["prompt"], origin), "reference": _text(row, "reference", origin)}


PARSERS = {"demonstrations": parse_demonstration, "preferences": parse_pair, "eval": parse_eval}
