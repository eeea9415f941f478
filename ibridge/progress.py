"""Progress of a loop on stderr: tqdm's bar on a terminal, a plain line every N seconds elsewhere.

A batch job (Slurm, CI) writes stderr to a file, where a carriage-return bar becomes one
unreadable line per refresh. Where stderr is not a terminal, :func:`progress_bar` returns a
:class:`LineProgress` instead, which writes a line such as
``sft (jsd): step 40/120 (33%), 2.1 step/s, 19 s, ~38 s left, loss=0.4123`` at most every
``IBRIDGE_PROGRESS_SECONDS`` seconds (default 30) and one when the loop ends.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

DEFAULT_SECONDS = 30.0
ENV_SECONDS = "IBRIDGE_PROGRESS_SECONDS"


def line_interval() -> float:
    """Seconds between progress lines (``IBRIDGE_PROGRESS_SECONDS``; a bad value is an error)."""
    raw = os.environ.get(ENV_SECONDS)
    if raw is None or raw == "":
        return DEFAULT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_SECONDS}={raw!r}: expected a number of seconds >= 0") from None
    if not value >= 0:
        raise ValueError(f"{ENV_SECONDS}={raw!r}: expected a number of seconds >= 0")
    return value


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed stream
        return False


def progress_bar(iterable: Iterable | None = None, *, desc: str | None, total: int | None = None,
                 initial: int = 0, unit: str = "it", disable: bool = False, stream=None):
    """tqdm (same arguments) where `stream` (stderr) is a terminal, else a :class:`LineProgress`."""
    stream = sys.stderr if stream is None else stream
    if disable or _is_terminal(stream):
        return tqdm(iterable, desc=desc, total=total, initial=initial, unit=unit, dynamic_ncols=True,
                    mininterval=0.5, disable=disable, file=stream)
    return LineProgress(iterable, desc=desc, total=total, initial=initial, unit=unit, stream=stream)


def _seconds(value: float) -> str:
    if value < 120:
        return f"{value:.0f} s"
    return f"{value / 60:.1f} min" if value < 7200 else f"{value / 3600:.1f} h"


class LineProgress:
    """The part of tqdm's interface the loops use (iterate, ``update``, ``set_postfix``, ``close``),
    written as whole lines at most every `interval` seconds, and once at the end."""

    def __init__(self, iterable: Iterable | None = None, *, desc: str | None, total: int | None = None,
                 initial: int = 0, unit: str = "it", stream=None, interval: float | None = None, clock=None):
        self.iterable = iterable
        self.desc = desc or ""
        self.total = total if total is not None else (len(iterable) + initial if hasattr(iterable, "__len__") else None)
        self.n = initial
        self.unit = unit
        self.stream = sys.stderr if stream is None else stream
        self.interval = line_interval() if interval is None else interval
        self._clock = clock or time.monotonic
        self._start = self._last = self._clock()
        self._start_n = self._written_n = initial
        self._postfix = ""
        self._closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._clock()
        if now - self._last >= self.interval:
            self._write(now)

    def set_postfix(self, **values) -> None:
        self._postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.n != self._written_n:  # the end, unless the last line already said it
            self._write(self._clock())

    def line(self, now: float) -> str:
        elapsed = now - self._start
        done = self.n - self._start_n
        parts = [f"{self.unit} {self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total
                 else f"{self.n} {self.unit}"]
        if elapsed > 0 and done > 0:
            rate = done / elapsed
            parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}")
        parts.append(_seconds(elapsed))
        if self.total and done > 0 and self.n < self.total:
            parts.append(f"~{_seconds((self.total - self.n) * elapsed / done)} left")
        if self._postfix:
            parts.append(self._postfix)
        return f"{self.desc}: " * bool(self.desc) + ", ".join(parts)

    def _write(self, now: float) -> None:
        print(self.line(now), file=self.stream, flush=True)
        self._last = now
        self._written_n = self.n
