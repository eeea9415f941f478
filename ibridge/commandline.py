"""What the command line does before Hydra starts (docs/design.md §3).

``--help`` (every option with its YAML comment: :mod:`ibridge.helptext`), tab completion
with the JOB word (:mod:`ibridge.completion`), and for a sweep (``-m``) its checks, cell
count, time estimate and ``--dry-run`` preview (:mod:`ibridge.sweeps`). Each either prints
and exits, or hands the arguments on to Hydra.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ibridge.config import JOBS
from ibridge.terminal import width


def _fail(message: str) -> None:
    print(f"ibridge: {message}", file=sys.stderr)
    raise SystemExit(2)


def resume_first(args: list[str]) -> list[str]:
    """``sweep.resume=<folder>|last`` as Hydra arguments (before the default grid is added)."""
    from ibridge.sweeps import SweepError, resume_sweep

    try:
        return resume_sweep(args)
    except SweepError as err:
        _fail(str(err))


def before_hydra(args: list[str], conf_dir: Path) -> list[str]:
    """Answer ``--help`` and completion queries, check and announce a sweep; the arguments for Hydra."""
    from ibridge.completion import is_query, prepare_query
    from ibridge.helptext import HELP_FLAGS, help_text
    from ibridge.sweeps import DRY_RUN, before_sweep, is_multirun

    if is_query(args):
        prepare_query(JOBS)
        return args
    if any(a in HELP_FLAGS for a in args):
        from ibridge.composing import composition_errors, composition_message, task_overrides

        try:
            print(help_text(conf_dir, [a for a in task_overrides(args) if "," not in a], width()))
        except composition_errors() as err:
            _fail(f"config error: {composition_message(err)}")
        raise SystemExit(0)
    if is_multirun(args):
        return before_sweep(conf_dir, args, width())
    if DRY_RUN in args:
        _fail("--dry-run previews a sweep's cells (with -m); `ibridge --cfg job ...` prints one run's config")
    return args
