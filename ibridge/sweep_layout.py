"""What lies in a sweep folder besides its cells: `ibridge report`'s own run (docs/design.md §3).

A sweep folder holds one folder per cell (``<n>_<overrides>``, each with a results.json), the
report's files (report.md, report.json, PNGs), ``dashboard/``, and ``report/<overrides>/``: the
run folder of ``ibridge report`` for that sweep (its results.json, wandb run, run_log.json).
Whatever reads a sweep's cells must not count the report run as one (:func:`is_report_run`).
"""

from __future__ import annotations

import json
from pathlib import Path

REPORT_FOLDER = "report"


def is_report_run(folder: Path) -> bool:
    """Whether a run folder below a sweep is a report run's (``<sweep>/report/<name>/``), not a
    cell's: by its results.json, or, while it runs, by the overrides Hydra wrote first."""
    folder = Path(folder)
    if folder.parent.name != REPORT_FOLDER:
        return False
    try:
        if (folder / "results.json").is_file():
            return json.loads((folder / "results.json").read_text()).get("job") == "report"
        overrides = (folder / ".hydra" / "overrides.yaml").read_text().splitlines()
    except (OSError, ValueError, AttributeError):
        return False
    return any(line.strip() in ("- job=report", "- +job=report") for line in overrides)
