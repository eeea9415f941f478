"""A sweep before it starts: its cells, their checks, a time estimate, and resuming (docs/design.md §3).

``ibridge -m ...`` expands its axes into cells the way Hydra's basic sweeper does
(``hydra.sweeper.params`` of the chosen ``grid``, then the command line's axes), then:

- checks the cells before any folder is made: every value of every axis is composed and
  validated once (with the first value of the other axes), and each bad one is a line of
  its own, ``ibridge: config error in cell #2 (lr=-1): lr=-1.0: expected a number > 0``;
- prints how many cells will run and about how long they take (:mod:`ibridge.sweep_time`);
- with ``--dry-run`` (or ``--cfg``, which Hydra cannot print for a sweep) lists the cells
  and stops there.

``sweep.resume=<folder>|last`` runs the sweep again in that folder (``last``: the newest
under ``multirun/``), with the same overrides when none are given: the cells that completed
there are skipped (``ibridge.cli.run`` says "skipped") once each of their stages and
evaluations has found its inputs unchanged (a cell whose data or models changed is recorded
failed, "stale run: ..."), the others resume or start.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from ibridge.composing import HYDRA_PREFIXES, compose, composition_errors, composition_message, task_overrides
from ibridge.terminal import wrap

SWEEPS_ROOT = Path("multirun")
MULTIRUN_FLAGS = ("-m", "--multirun")
DRY_RUN = "--dry-run"
RESUME_KEY = "sweep.resume"
MAX_LISTED = 200  # a preview lists at most this many cells


class SweepError(ValueError):
    """A sweep cannot start as asked; the message is one line."""


def is_multirun(args: list[str]) -> bool:
    return any(arg in MULTIRUN_FLAGS for arg in args)


# --- resuming ---------------------------------------------------------------------------------


def resume_sweep(args: list[str]) -> list[str]:
    """Turn ``sweep.resume=<folder>|last`` into ``hydra.sweep.dir=<folder>``, adding the
    sweep's own overrides (from its ``multirun.yaml``) when the command line gives none."""
    given = [a for a in args if a.startswith(f"{RESUME_KEY}=")]
    if not given:
        return args
    rest = [a for a in args if not a.startswith(f"{RESUME_KEY}=")]
    if not is_multirun(rest):
        raise SweepError(f"{given[-1]}: resuming a sweep needs -m (ibridge -m {given[-1]} ...)")
    folder = sweep_folder(given[-1].split("=", 1)[1])
    if any(a.startswith("hydra.sweep.dir=") for a in rest):
        raise SweepError(f"{given[-1]} and hydra.sweep.dir both name the sweep's folder; give one")
    own = [a for a in task_overrides(rest) if not a.startswith("job=")]
    if not own:
        rest += [a for a in _recorded_overrides(folder) if not a.startswith("job=")]
    return [*rest, f"hydra.sweep.dir={folder}"]


def sweep_folder(value: str) -> Path:
    """The folder ``sweep.resume`` names: a sweep folder (holding ``multirun.yaml``), or the newest."""
    if value == "last":
        from ibridge.analysis.report import newest_sweep

        try:
            folder = newest_sweep(SWEEPS_ROOT)
        except FileNotFoundError as err:
            raise SweepError(f"{RESUME_KEY}=last: {err}") from None
    else:
        folder = Path(value).expanduser()
    if not (folder / "multirun.yaml").is_file():
        raise SweepError(f"{RESUME_KEY}={value}: {folder} is not a sweep folder (no multirun.yaml in it)")
    return folder


def _recorded_overrides(folder: Path) -> list[str]:
    """The task overrides a sweep was started with (Hydra keeps them in multirun.yaml)."""
    try:
        recorded = yaml.safe_load((folder / "multirun.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SweepError(f"{folder / 'multirun.yaml'}: unreadable ({err})") from None
    return [str(o) for o in ((recorded.get("hydra") or {}).get("overrides") or {}).get("task") or []]


# --- the cells ---------------------------------------------------------------------------------


def plan_cells(conf_dir: Path, args: list[str]) -> tuple[list[list[str]], dict]:
    """The sweep's cells (each a list of overrides, in Hydra's order) and the Hydra config
    (``hydra.sweeper.params``, ``hydra.launcher``) of the command."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = task_overrides(args)
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except composition_errors() as err:
        raise SweepError(f"config error: {composition_message(err)}") from None
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    hydra_args = [a for a in args if "=" in a and a.lstrip("+~").startswith(HYDRA_PREFIXES)]
    try:
        hydra_cfg = compose(conf_dir, fixed + hydra_args, return_hydra_config=True).hydra
    except composition_errors():
        try:  # a launcher's settings this composition cannot read: Hydra itself will say if they are wrong
            hydra_cfg = compose(conf_dir, fixed, return_hydra_config=True).hydra
        except composition_errors() as err:
            raise SweepError(f"config error: {composition_message(err)}") from None
    params = [f"{key}={value}" for key, value in (hydra_cfg.sweeper.params or {}).items()]
    try:
        cells = BasicSweeper.split_arguments(parser.parse_overrides(params + overrides), None)[0]
    except composition_errors() as err:
        raise SweepError(f"config error: {composition_message(err)}") from None
    return [list(cell) for cell in cells], {"launcher": hydra_cfg.launcher}


def axes(cells: list[list[str]]) -> dict[str, list[str]]:
    """Each swept key and its values, in order of first appearance."""
    values: dict[str, list[str]] = {}
    for cell in cells:
        for override in cell:
            key, value = override.split("=", 1)
            seen = values.setdefault(key, [])
            if value not in seen:
                seen.append(value)
    return {key: seen for key, seen in values.items() if len(seen) > 1}


def probe_cells(cells: list[list[str]]) -> list[int]:
    """Indices of the cells that together hold every value of every axis: the first cell, and
    for each other value the first cell that has it."""
    chosen = [0]
    seen = set(cells[0]) if cells else set()
    for index, cell in enumerate(cells):
        if any(override not in seen for override in cell):
            chosen.append(index)
            seen.update(cell)
    return chosen


def check_cells(conf_dir: Path, cells: list[list[str]]) -> tuple[list[str], dict[int, object]]:
    """One message per bad cell among :func:`probe_cells`'s (composition or validation), and
    the configs of the good ones."""
    from ibridge.config import ConfigError, validate

    errors, configs, seen = [], {}, set()
    varying = set(axes(cells))
    for index in probe_cells(cells):
        label = " ".join(o for o in cells[index] if o.split("=", 1)[0] in varying) or "the only cell"
        try:
            cfg = compose(conf_dir, cells[index])
            validate(cfg)
        except (*composition_errors(), ConfigError) as err:
            message = str(err) if isinstance(err, ConfigError) else composition_message(err)
            if message not in seen:  # an error every cell shares is said once
                errors.append(f"config error in cell #{index} ({label}): {message}")
                seen.add(message)
            continue
        configs[index] = cfg
    return errors, configs


def preview(cells: list[list[str]], estimate_line: str, width: int) -> list[str]:
    """The ``--dry-run`` listing: what every cell shares, then one line per cell (what varies)."""
    varying = axes(cells)
    shared = [o for o in cells[0] if o.split("=", 1)[0] not in varying] if cells else []
    lines = [f"ibridge: sweep of {len(cells)} cells" + (
        f" ({' x '.join(f'{len(v)} {k}' for k, v in varying.items())})" if varying else "")]
    if shared:
        lines += wrap("every cell: " + " ".join(shared), width, indent="  ")
    digits = len(str(max(len(cells) - 1, 0)))
    for index, cell in enumerate(cells[:MAX_LISTED]):
        own = " ".join(o for o in cell if o.split("=", 1)[0] in varying) or "(no swept axis)"
        lines += wrap(f"#{index:<{digits}}  {own}", width, indent="  ", subsequent=" " * (digits + 5))
    if len(cells) > MAX_LISTED:
        lines.append(f"  ... and {len(cells) - MAX_LISTED} more")
    lines += wrap(estimate_line, width)
    return lines


def before_sweep(conf_dir: Path, args: list[str], width: int) -> list[str]:
    """Check a sweep's cells and announce it; print the preview and exit for ``--dry-run`` and
    ``--cfg``. Returns the arguments for Hydra (without ``--dry-run``)."""
    from ibridge.sweep_time import estimate

    dry_run = DRY_RUN in args or any(a in ("--cfg", "-c") for a in args)
    args = [a for a in args if a != DRY_RUN]
    try:
        cells, hydra_cfg = plan_cells(conf_dir, args)
    except SweepError as err:
        _fail([str(err)])
    errors, configs = check_cells(conf_dir, cells)
    if errors:
        _fail(errors)
    estimate_line = estimate(cells, configs, hydra_cfg)
    if dry_run:
        if any(a in ("--cfg", "-c") for a in args):
            print("\n".join(wrap("ibridge: --cfg prints one run's config; a sweep's cells are below (drop -m "
                                 "and give one cell's overrides to see its config)", width)))
        print("\n".join(preview(cells, estimate_line, width)))
        raise SystemExit(0)
    print("\n".join(wrap(f"ibridge: sweep of {len(cells)} cells; {estimate_line} (--dry-run lists them)", width)),
          flush=True)
    return args


def _fail(lines: list[str]) -> None:
    for line in lines:
        print(f"ibridge: {line}" if not line.startswith("ibridge:") else line, file=sys.stderr)
    raise SystemExit(2)


def completed_earlier(run_dir: Path) -> dict | None:
    """The results of a cell that completed in this folder before (a resumed sweep skips it),
    else None. Called once the folder's run was found to have the same config
    (``ibridge.cli.prepare_run_dir`` refuses a changed one)."""
    import json

    path = Path(run_dir) / "results.json"
    try:
        results = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None
    return results if isinstance(results, dict) and results.get("status") == "completed" else None
