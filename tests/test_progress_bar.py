"""Progress where stderr is not a terminal: a line every N seconds (ibridge/progress.py)."""

from __future__ import annotations

import io

import pytest
from tqdm import tqdm

from ibridge.progress import LineProgress, line_interval, progress_bar


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_tqdms_bar_and_a_file_gets_lines():
    assert isinstance(progress_bar(range(3), desc="x", stream=Terminal()), tqdm)
    assert isinstance(progress_bar(range(3), desc="x", stream=io.StringIO()), LineProgress)
    assert isinstance(progress_bar(range(3), desc="x", stream=io.StringIO(), disable=True), tqdm)


def test_a_line_at_most_every_interval_and_one_at_the_end():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(range(11, 21), desc="sft (jsd)", total=20, initial=10, unit="step", stream=out, interval=30,
                       clock=clock)
    seen = []
    for step in bar:
        seen.append(step)
        clock.now += 12.5  # a step every 12.5 s: lines after steps 13, 16 and 19 (>= 30 s apart)
        if step == 17:
            bar.set_postfix(loss="0.4123")
    lines = out.getvalue().splitlines()
    assert seen == list(range(11, 21))
    assert [line.split(",")[0] for line in lines] == ["sft (jsd): step 13/20 (65%)", "sft (jsd): step 16/20 (80%)",
                                                      "sft (jsd): step 19/20 (95%)", "sft (jsd): step 20/20 (100%)"]
    # 3 steps in 37.5 s; 7 steps left at that pace: 87.5 s; the postfix once set
    assert lines[0] == "sft (jsd): step 13/20 (65%), 12.5 s/step, 38 s, ~88 s left"
    assert lines[2].endswith(", loss=0.4123") and "\r" not in out.getvalue()


def test_no_repeated_last_line_and_lines_without_a_total():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(iter(["a", "b"]), desc="gen", unit="batch", stream=out, interval=0, clock=clock)
    for _ in bar:
        clock.now += 0.5
    bar.close()
    assert out.getvalue().splitlines() == ["gen: 1 batch, 2 batch/s, 0 s", "gen: 2 batch, 2 batch/s, 1 s"]


@pytest.mark.parametrize("raw, value", [(None, 30.0), ("5", 5.0), ("0", 0.0)])
def test_the_interval_comes_from_the_environment(monkeypatch, raw, value):
    if raw is None:
        monkeypatch.delenv("IBRIDGE_PROGRESS_SECONDS", raising=False)
    else:
        monkeypatch.setenv("IBRIDGE_PROGRESS_SECONDS", raw)
    assert line_interval() == value


@pytest.mark.parametrize("raw", ["soon", "-1"])
def test_a_bad_interval_is_a_one_line_error(monkeypatch, raw):
    monkeypatch.setenv("IBRIDGE_PROGRESS_SECONDS", raw)
    with pytest.raises(ValueError, match=r"IBRIDGE_PROGRESS_SECONDS=.*expected a number of seconds >= 0"):
        line_interval()
