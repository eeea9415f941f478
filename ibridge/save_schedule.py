"""When the training loop writes its resumable state, and the half-filled metrics window it carries.

A state is written (docs/design.md §3, "Resuming"):

* every ``save_every`` optimiser steps (``sft.save_every`` / ``dpo.save_every``; 0: never);
* once ``save_every_min`` minutes have passed since the stage started or last saved (0: never):
  a state's cost is the model's size (fp32 weights and AdamW moments, 12 bytes a parameter:
  96 GB at 8B, minutes to write), so a cadence in time costs the same share of a run whatever
  the model, where one in steps cost 96 GB every 50 steps at 8B;
* at once on SIGTERM: after the step in progress, not at the next logging step, which could
  be many steps away (Slurm and torchrun give a stopping job little time).

The two last are decided by every rank together at the top of a step (the flags ride on the
step's one collective, ``ibridge.training.optimise``), and the state is that of the step
before. A state may be written between two logging steps: the metrics averaged since the last
log (every rank's sums, added up) go into it, and on resume rank 0 starts from them, so the
next logged means are those of an uninterrupted run (up to float rounding).
"""

from __future__ import annotations

import time

from ibridge.distributed import DistInfo, all_reduce_sum


class SaveSchedule:
    """Step and time cadence of the resumable state, and the last step saved (or resumed from)."""

    def __init__(self, every_steps: int, every_min: float, last_saved: int = 0):
        self.every_steps, self.every_min = int(every_steps), float(every_min)
        self.last_saved = last_saved
        self._since = time.monotonic()

    def time_due(self) -> bool:
        """This rank's clock says a timed save is due (the caller combines the ranks' answers)."""
        return self.every_min > 0 and time.monotonic() - self._since >= 60.0 * self.every_min

    def step_due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def saved(self, step: int) -> None:
        self.last_saved = step
        self._since = time.monotonic()


def window_totals(window: dict[str, list], info: DistInfo) -> dict[str, list[float]]:
    """The metrics window summed over the ranks, as plain floats (a collective: every rank calls)."""
    keys = sorted(window)
    flat = [float(value) for key in keys for value in window[key]]
    totals = all_reduce_sum(flat, info)
    out, start = {}, 0
    for key in keys:
        size = len(window[key])
        out[key] = [float(value) for value in totals[start : start + size]]
        start += size
    return out


def restore_window(window: dict[str, list], saved: dict[str, list[float]] | None, info: DistInfo) -> None:
    """Rank 0 resumes the window where the state left it; the others start empty, so the next
    log's sum over the ranks counts every value once."""
    if saved and info.is_main:
        for key, values in saved.items():
            window[key] = list(values)
