"""`ibridge report`: tables and plots of a sweep (default: the newest under multirun/).

Trains nothing and loads no model: reads every results.json below
``report.path`` and writes report.md, report.json and PNGs into that folder
(see :mod:`ibridge.analysis.report`). With wandb, a `report` run in the sweep's
group holds the cells and paired-effects tables and the plots
(:mod:`ibridge.analysis.wandb_report`). The job's own run folder, and so that run's
id, is inside the sweep: ``<sweep>/report/<overrides>`` (:mod:`ibridge.sweep_layout`).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from ibridge.config import ConfigError
from ibridge.run_folders import SWEEPS_ROOT  # as the report run folder (run_folders.py) finds it


def run(ctx) -> None:
    from ibridge.analysis.report import newest_sweep, write_report

    path = OmegaConf.select(ctx.cfg, "report.path", default=None)
    if path is None:
        try:
            sweep = newest_sweep(SWEEPS_ROOT)
        except FileNotFoundError as err:
            raise ConfigError(f"report.path=null: {err}") from None
    else:
        sweep = Path(str(path)).expanduser()
        if not sweep.is_dir():
            raise ConfigError(f"report.path={path}: no such folder")
    try:
        report = write_report(sweep)
    except FileNotFoundError as err:
        raise ConfigError(f"report.path={sweep}: {err}") from None
    from ibridge.analysis.wandb_report import log_report

    logger = getattr(ctx, "logger", None)
    group = log_report(logger, report, sweep, home=ctx.run_dir) if logger is not None else None
    ctx.results["report"] = {
        "path": report["files"]["report_md"],
        "sweep": str(sweep),
        "cells": report["n_cells"],
        "runs": report["n_runs"],
        "failed": report["n_failed_runs"],
        "failed_cells": report["n_failed_cells"],
    }
    if group:
        ctx.results["report"]["wandb_group"] = group
