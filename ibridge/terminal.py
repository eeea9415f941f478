"""Terminal output that fits: the width to write for, and lines wrapped at word boundaries.

What ibridge prints for people (run tables, a sweep's cell lines, previews) fits the
terminal, 80 columns when the output is not a terminal (``COLUMNS`` overrides both). Lines
wrap between words only: a path or a number is never cut, even when it alone is wider.
"""

from __future__ import annotations

import shutil
import textwrap

DEFAULT_WIDTH = 80


def width() -> int:
    """``COLUMNS``, else the terminal's width, else 80 (a file, a pipe, a batch log)."""
    return max(shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns, 40)


def wrap(text: str, columns: int | None = None, indent: str = "", subsequent: str | None = None) -> list[str]:
    """`text` as lines of at most `columns` characters, broken between words only
    (a word longer than a line, such as a long path, gets a line of its own, whole)."""
    columns = columns or width()
    return textwrap.wrap(text, width=columns, initial_indent=indent,
                         subsequent_indent=indent + "    " if subsequent is None else indent + subsequent,
                         break_long_words=False, break_on_hyphens=False) or [indent]
