"""Run folders that a failed start must not leave behind or touch (docs/design.md §3).

Hydra makes a run's folder (with ``.hydra/`` and its log file) before ibridge has checked
the config. When the config is refused, a folder that holds nothing else goes again, with
the parents it was made in that are left empty; a folder holding an earlier run is kept as
it was.
"""

from __future__ import annotations

import shutil
from pathlib import Path

RUN_MARKER = "run.json"  # written once a run starts in the folder (ibridge.cli.prepare_run_dir)
# What Hydra and a refused start write into a folder before any run starts there.
SCAFFOLDING = (".hydra", "results.json")


def holds_a_run(run_dir: Path) -> bool:
    """Whether a run started in `run_dir` at some point (its results must then be kept)."""
    return (Path(run_dir) / RUN_MARKER).is_file()


def _unused(run_dir: Path) -> bool:
    return all(entry.name in SCAFFOLDING or entry.suffix == ".log" for entry in run_dir.iterdir())


def discard_unused_run_dir(run_dir: Path, stop_at: Path | None = None) -> bool:
    """Remove `run_dir` when no run ever started there, then the parents left empty below
    `stop_at` (default: the working folder). True when removed. The working folder and its
    parents are never removed."""
    run_dir = Path(run_dir)
    stop = (stop_at or Path.cwd()).resolve()
    here = Path.cwd().resolve()
    if not run_dir.is_dir() or holds_a_run(run_dir) or not _unused(run_dir):
        return False
    resolved = run_dir.resolve()
    if resolved == here or resolved in here.parents:  # `hydra.run.dir=.`: not ours to remove
        return False
    shutil.rmtree(run_dir)
    parent = resolved.parent
    while stop in parent.parents:  # only folders below `stop`, and only while empty
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent
    return True
