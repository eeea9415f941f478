"""Tab completion through Hydra's (``eval "$(ibridge -sc install=bash)"``), with the JOB word.

Hydra's completion reads the command line from ``COMP_LINE`` and parses every word before
the one being completed as an override; ``ibridge train objective=j<TAB>`` then fails on
``train``. Before Hydra answers, the JOB word becomes the override it stands for
(``job=train``), and while the first word is being typed the matching jobs are offered too.
"""

from __future__ import annotations

import os

COMPLETION_FLAGS = ("-sc", "--shell-completion")


def is_query(args: list[str]) -> bool:
    """``-sc query=<shell>``: the shell asks what may come next."""
    return any(a in COMPLETION_FLAGS and i + 1 < len(args) and args[i + 1].startswith("query=")
               for i, a in enumerate(args))


def rewrite_line(line: str, jobs: tuple[str, ...]) -> tuple[str, list[str]]:
    """``COMP_LINE`` with its JOB word as ``job=<JOB>``, and the jobs that complete the word
    being typed when that word is the first one after the program."""
    words = line.split()
    typing_new_word = not line or line.endswith(" ")
    program, rest = (words[0], words[1:]) if words else ("ibridge", [])
    current = "" if typing_new_word else (rest[-1] if rest else "")
    before = rest if typing_new_word else rest[:-1]
    positional = [w for w in before if not w.startswith("-") and "=" not in w]
    offered = []
    if not positional and "=" not in current and not current.startswith("-"):
        offered = [job for job in jobs if job.startswith(current)]
    rewritten = [f"job={w}" if w in jobs and w in positional[:1] else w for w in before]
    tail = "" if typing_new_word else current
    return " ".join([program, *rewritten, tail]).rstrip() + (" " if typing_new_word else ""), offered


def prepare_query(jobs: tuple[str, ...]) -> None:
    """Rewrite ``COMP_LINE`` for Hydra and print the matching jobs (the shell reads both)."""
    line = os.environ.get("COMP_LINE", "")
    rewritten, offered = rewrite_line(line, jobs)
    os.environ["COMP_LINE"] = rewritten
    if offered:
        print("\n".join(offered))  # one a line: bash (compgen -W) and fish both read that
