"""Run by tests/test_rank_faults.py under torchrun (2 CPU ranks, gloo); not a test module.

`ibridge` itself, with two test-only faults that a real cluster produces on its own:
IBRIDGE_TEST_FAIL_RANK=R makes rank R raise in its third training forward (a CUDA error,
a bad batch); every rank writes its pid to ``pid-<rank>`` in the working folder, so that
the test can send SIGTERM to one rank alone (Slurm preempting one node), and the number of
training forwards it has run to ``forwards-<rank>``, so that the test can tell at which step
each rank stopped.
Usage: torchrun --nproc_per_node 2 tests/rank_fault_worker.py [ibridge args...]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ibridge import stages  # noqa: E402
from ibridge.cli import main  # noqa: E402

RANK = os.environ.get("RANK", "0")
FAIL_RANK = os.environ.get("IBRIDGE_TEST_FAIL_RANK")
_demonstration_step = stages.demonstration_step


def failing_demonstration_step(objective, *args, **kwargs):
    compute = _demonstration_step(objective, *args, **kwargs)
    calls = {"n": 0}

    def wrapped(model, batch):
        calls["n"] += 1
        Path(f"forwards-{RANK}").write_text(str(calls["n"]))
        if RANK == FAIL_RANK and calls["n"] == 3:
            raise RuntimeError(f"injected failure on rank {RANK}")
        return compute(model, batch)

    return wrapped


if __name__ == "__main__":
    Path(f"pid-{RANK}").write_text(str(os.getpid()))
    stages.demonstration_step = failing_demonstration_step
    main(sys.argv[1:])
