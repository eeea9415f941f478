"""Tasks of the toy world, the prompt grammar, and the gold judge (docs/design.md §2).

A prompt is an instruction: a task word followed by one or more symbols, e.g.
``"sort 3 1 4"``. Symbols are the digit words ``"0"`` .. ``"9"``. Every task has
a computable answer (a non-empty tuple of digit words), so a response can be
graded exactly by :func:`judge`.

The judge needs no :class:`~ibridge.world.config.WorldConfig`: arithmetic is
always modulo 10 over the ten digit words, whatever ``num_symbols`` a world
draws its prompts from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

DIGITS: tuple[str, ...] = tuple(str(i) for i in range(10))
"""All symbol words. A world with ``num_symbols = k`` draws prompts from the first k."""


def _ints(words: Sequence[str]) -> list[int]:
    return [int(w) for w in words]


def _words(values) -> tuple[str, ...]:
    return tuple(str(v) for v in values)


TASKS: dict[str, Callable[[Sequence[str]], tuple[str, ...]]] = {
    # the default six (WorldConfig.tasks)
    "sort": lambda s: _words(sorted(_ints(s))),  # ascending
    "reverse": lambda s: tuple(reversed(s)),
    "max": lambda s: _words([max(_ints(s))]),
    "min": lambda s: _words([min(_ints(s))]),
    "add1": lambda s: _words((v + 1) % 10 for v in _ints(s)),  # each digit + 1 mod 10
    "count": lambda s: _words([len(s)]),  # how many items (needs max_len <= 9)
    # extra tasks a config may opt into
    "first": lambda s: (s[0],),
    "last": lambda s: (s[-1],),
    "sum": lambda s: _words([sum(_ints(s)) % 10]),  # sum mod 10
}
"""Task word -> function from the prompt's symbols to the answer words."""


def parse_prompt(prompt: str) -> tuple[str, tuple[str, ...]]:
    """Split an instruction ``"task s1 s2 ..."`` into ``(task, symbols)``.

    Raises ``ValueError`` (naming the prompt) for an unknown task word, no
    symbols, or a symbol that is not a digit word.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}: {prompt!r}")
    words = prompt.split()
    if len(words) < 2:
        raise ValueError(f"unparseable prompt {prompt!r}: expected a task word followed by symbols")
    task, symbols = words[0], tuple(words[1:])
    if task not in TASKS:
        raise ValueError(f"unparseable prompt {prompt!r}: unknown task {task!r} (known: {', '.join(TASKS)})")
    bad = [w for w in symbols if w not in DIGITS]
    if bad:
        raise ValueError(f"unparseable prompt {prompt!r}: symbols must be digit words 0..9, got {bad}")
    return task, symbols


def make_prompt(task: str, symbols: Sequence[str]) -> str:
    """The instruction text for ``task`` applied to ``symbols``."""
    return " ".join((task, *symbols))


def solve(prompt: str) -> tuple[str, ...]:
    """The correct answer words for an instruction, e.g. ``solve("sort 3 1 4") == ("1", "3", "4")``."""
    task, symbols = parse_prompt(prompt)
    return TASKS[task](symbols)


@dataclass(frozen=True)
class Judgement:
    """The gold judge's verdict on one response.

    ``reward`` in [0, 1]; ``first_error`` is the index (in response words) of the
    first wrong token, ``None`` when the response is exactly right (for a strict
    prefix of the answer it is ``len(response words)``, the missing token; for a
    response that runs on past a correct answer it is ``len(answer)``, the first
    extra token); ``answer`` the correct answer words.
    """

    reward: float
    first_error: int | None
    answer: tuple[str, ...]


def judge_words(answer: Sequence[str], response: Sequence[str]) -> Judgement:
    """:func:`judge` on already-split words (no prompt parsing)."""
    answer = tuple(answer)
    response = tuple(response)
    first_error: int | None = None
    for i, (a, r) in enumerate(zip(answer, response, strict=False)):
        if a != r:
            first_error = i
            break
    else:
        if len(response) < len(answer):
            first_error = len(response)
        elif len(response) > len(answer):
            first_error = len(answer)
    if first_error is None:
        return Judgement(reward=1.0, first_error=None, answer=answer)
    reward = first_error / max(len(answer), len(response))
    return Judgement(reward=float(reward), first_error=first_error, answer=answer)


def judge(prompt: str, response: str) -> Judgement:
    """Gold judge (docs/design.md §2): grade ``response`` to the instruction ``prompt``.

    ``reward = (correct words before the first mistake) / max(len(answer), len(response words))``,
    so an exact answer scores 1.0, an empty response 0.0, and both a premature end
    and extra tokens are penalised. ``response`` is decoded text without special
    tokens (words separated by whitespace). Raises ``ValueError`` naming the
    prompt when it cannot be parsed.
    """
    return judge_words(solve(prompt), response.split())
