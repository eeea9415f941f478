"""The row formats users bring, as the rows ibridge's schema reads (docs/design.md §4, "ibridge/data/").

Each raw row passes through :func:`normalise` before :mod:`ibridge.data.schema` checks it.
Rows already in ibridge's forms (``messages``; ``prompt``/``response``; ``chosen``/``rejected``)
pass unchanged. Converted:

- TRL prompt-completion, text ``{"prompt": str, "completion": str}`` or conversational
  ``{"prompt": [messages], "completion": [one assistant message]}``: the completion is
  the response (the loss is on it alone, as TRL's ``completion_only_loss``).
- ShareGPT ``{"conversations": [{"from": "human" | "gpt" | "system", "value": str}, ...]}``
  (``user``/``assistant``, and ``chatgpt`` for ``gpt``, too; an optional top-level
  ``system`` text comes first): a conversation, every assistant turn trained on. As
  preferences, LLaMA-Factory's form: ``conversations`` ending with the user's turn plus
  ``chosen``/``rejected`` messages ``{"from": "gpt", "value": str}``.
- Alpaca ``{"instruction", "input", "output"}`` (``input`` may be empty or missing; an
  optional ``system`` text): the prompt is the instruction, then a blank line and the input
  when there is one; the output is the response. As preferences, ``chosen``/``rejected``
  texts replace ``output``.

TRL's conversational preference rows with an explicit prompt (``{"prompt": [messages],
"chosen": [assistant message], "rejected": [...]}``) need no conversion: the schema reads
them. A row of the other kind (a preference pair where demonstrations are expected, or
the reverse) is refused with the ``data.examples`` setting that reads it.
"""

from __future__ import annotations

from ibridge.data.schema import DataError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}
DEMONSTRATION_KEYS = ("messages", "response", "completion", "conversations", "output")


def _type(value) -> str:
    return "null" if value is None else type(value).__name__


def _sharegpt_message(message, origin: str, field: str) -> dict:
    if not isinstance(message, dict) or "from" not in message or "value" not in message:
        raise DataError(f"{origin}: {field} must be an object with 'from' and 'value' (ShareGPT), "
                        f"got {_type(message) if not isinstance(message, dict) else sorted(message)}")
    role = SHAREGPT_ROLES.get(message["from"])
    if role is None:
        raise DataError(f"{origin}: {field}.from must be one of {', '.join(SHAREGPT_ROLES)} (ShareGPT), "
                        f"got {message['from']!r}")
    return {"role": role, "content": message["value"]}


def sharegpt_messages(row: dict, origin: str) -> list[dict]:
    """A ShareGPT row's ``conversations`` (and ``system``) as chat messages."""
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise DataError(f"{origin}: conversations must be a list of {{from, value}} (ShareGPT), got {_type(turns)}")
    messages = [_sharegpt_message(m, origin, f"conversations[{i}]") for i, m in enumerate(turns)]
    system = row.get("system")
    if system:
        if not isinstance(system, str):
            raise DataError(f"{origin}: system must be a string, got {_type(system)}")
        messages.insert(0, {"role": "system", "content": system})
    return messages


def alpaca_prompt(row: dict, origin: str):
    """An Alpaca row's prompt: the instruction, then a blank line and the input when given;
    a list of messages when the row has a ``system`` text."""
    instruction, extra = row.get("instruction"), row.get("input")
    if not isinstance(instruction, str):
        raise DataError(f"{origin}: instruction must be a string (Alpaca), got {_type(instruction)}")
    if extra is not None and not isinstance(extra, str):
        raise DataError(f"{origin}: input must be a string (Alpaca), got {_type(extra)}")
    text = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    system = row.get("system")
    if system:
        return [{"role": "system", "content": str(system)}, {"role": "user", "content": text}]
    return text


def _completion(row: dict, origin: str) -> str:
    """TRL's ``completion``: text, or a list of exactly one assistant message."""
    completion = row["completion"]
    if isinstance(completion, str):
        return completion
    if not isinstance(completion, list) or len(completion) != 1:
        count = len(completion) if isinstance(completion, list) else _type(completion)
        raise DataError(f"{origin}: completion must be text or a list of one assistant message "
                        f"(TRL prompt-completion), got {count}{' messages' if isinstance(completion, list) else ''}")
    message = completion[0]
    if not isinstance(message, dict) or message.get("role") != "assistant":
        raise DataError(f"{origin}: completion[0] must be an assistant message {{role: assistant, content}}")
    if not isinstance(message.get("content"), str):
        raise DataError(f"{origin}: completion[0].content must be a string, got {_type(message.get('content'))}")
    return message["content"]


def _demonstration(row: dict, origin: str) -> dict:
    if row.get("messages") is not None or row.get("response") is not None:
        return row
    if row.get("chosen") is not None and row.get("rejected") is not None:
        raise DataError(f"{origin}: a preference pair (chosen, rejected), not a demonstration; set "
                        f"data.examples=preferences to train a preference objective (dpo, ...) on this file")
    if row.get("completion") is not None:
        if "label" in row:
            raise DataError(f"{origin}: an unpaired preference row (completion, label) is not supported; "
                            f"expected a demonstration or, with data.examples=preferences, chosen and rejected")
        if row.get("prompt") is None:
            raise DataError(f"{origin}: missing field 'prompt' (TRL prompt-completion)")
        return {"prompt": row["prompt"], "response": _completion(row, origin)}
    if row.get("conversations") is not None:
        return {"messages": sharegpt_messages(row, origin)}
    if row.get("instruction") is not None:
        if not isinstance(row.get("output"), str):
            raise DataError(f"{origin}: output must be a string (Alpaca), got {_type(row.get('output'))}")
        return {"prompt": alpaca_prompt(row, origin), "response": row["output"]}
    return row


def _reply(value, origin: str, field: str):
    """A ShareGPT preference side: ``{"from": "gpt", "value"}`` → its text; anything else as is."""
    if isinstance(value, dict) and "from" in value:
        message = _sharegpt_message(value, origin, field)
        if message["role"] != "assistant":
            raise DataError(f"{origin}: {field}.from must be the assistant's (gpt), got {value['from']!r}")
        return message["content"]
    return value


def _preference(row: dict, origin: str) -> dict:
    if row.get("chosen") is None or row.get("rejected") is None:
        if any(row.get(key) is not None for key in DEMONSTRATION_KEYS):
            raise DataError(f"{origin}: a demonstration, not a preference pair (no chosen and rejected); set "
                            f"data.examples=demonstrations to train a demonstration objective (sft, ...) on it")
        return row
    if row.get("conversations") is not None:
        return {"prompt": sharegpt_messages(row, origin), "chosen": _reply(row["chosen"], origin, "chosen"),
                "rejected": _reply(row["rejected"], origin, "rejected")}
    if row.get("instruction") is not None and row.get("prompt") is None:
        return {"prompt": alpaca_prompt(row, origin), "chosen": row["chosen"], "rejected": row["rejected"]}
    return row


def _eval(row: dict, origin: str) -> dict:
    if row.get("prompt") is None and row.get("instruction") is not None and row.get("input"):
        return {"prompt": alpaca_prompt(row, origin), "reference": row.get("output")}
    return row


CONVERTERS = {"demonstrations": _demonstration, "preferences": _preference, "eval": _eval}


def normalise(row, kind: str, origin: str):
    """`row` in the form :mod:`ibridge.data.schema` reads for `kind` (unchanged when it already is)."""
    if not isinstance(row, dict):
        return row  # the schema says what it expected
    return CONVERTERS[kind](row, origin)
