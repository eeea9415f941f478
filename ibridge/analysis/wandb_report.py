"""The `report` wandb run: a sweep's report as wandb Tables and images, in the sweep's group.

Reads only the plain data the report already computed (what report.json holds:
``cells``, ``columns``, ``effects``, ``files``), so it does not depend on how the
report computes it. Logs

- ``report/cells``: one row per cell: objective, SFT lr, the overrides that vary,
  seeds, runs, status, error, then ``<metric> mean`` / ``<metric> se`` for every
  report column (``eval.dpo.win_rate``, ...);
- ``report/effects``: one row per paired effect against the baseline cell;
- ``report/<plot>``: each PNG of the report;

and the counts (``report/n_cells``, ...) in its summary.
"""

from __future__ import annotations

import json
from pathlib import Path

from ibridge.naming import fmt_lr

CELL_COLUMNS = ("objective", "lr", "overrides", "seeds", "runs", "completed", "status", "error")
EFFECT_COLUMNS = ("metric", "objective", "lr", "mean", "se", "relative", "n_units", "ci95_low", "ci95_high", "p",
                  "p_holm", "resolved")


def _select(tree, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _scalar(value):
    """A table cell: numbers and text as they are, anything else as JSON text."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    return json.dumps(value)


def cells_table(payload: dict) -> tuple[list[str], list[list]]:
    """Columns and rows of ``report/cells``."""
    metric_keys = list(payload.get("columns") or {})
    columns = [*CELL_COLUMNS, *(f"{key} {part}" for key in metric_keys for part in ("mean", "se"))]
    rows = []
    for cell in payload.get("cells") or []:
        lr = cell.get("lr")
        row = [cell.get("objective"), lr if isinstance(lr, (int, float)) else _scalar(lr),
               cell.get("varying_overrides") or "", ",".join(str(s) for s in cell.get("seeds") or []),
               cell.get("runs"), cell.get("completed"), cell.get("status"), cell.get("error") or ""]
        for key in metric_keys:
            stat = _select(cell.get("metrics") or {}, key) or {}
            row += [stat.get("mean"), stat.get("se")]
        rows.append([_scalar(value) for value in row])
    return columns, rows


def effects_table(payload: dict) -> tuple[list[str], list[list]]:
    """Columns and rows of ``report/effects``."""
    rows = []
    for metric, effects in (payload.get("effects") or {}).items():
        for effect in effects:
            ci = effect.get("ci95") or [None, None]
            rows.append([metric, effect.get("objective"), _scalar(effect.get("lr")), effect.get("mean"),
                         effect.get("se"), effect.get("relative"), len(effect.get("units") or []), ci[0], ci[1],
                         effect.get("p"), effect.get("p_holm"), effect.get("resolved")])
    return list(EFFECT_COLUMNS), [[_scalar(v) for v in row] for row in rows]


def plot_files(payload: dict) -> dict[str, Path]:
    """The report's PNGs, by name."""
    files = payload.get("files") or {}
    return {name: Path(path) for name, path in files.items() if str(path).endswith(".png") and Path(path).is_file()}


def sweep_group(payload: dict, sweep: Path) -> str:
    """The sweep's wandb group: what its cells logged under (results.json's ``wandb_group``),
    else the name the CLI gives a sweep folder."""
    for results_json in sorted(Path(sweep).glob("*/results.json")):
        try:
            group = json.loads(results_json.read_text()).get("wandb_group")
        except (OSError, json.JSONDecodeError):
            continue
        if group:
            return group
    sweep = Path(sweep).resolve()
    return f"sweep-{sweep.parent.name}-{sweep.name}"


def log_report(logger, payload: dict, sweep: Path, home: Path | None = None) -> str | None:
    """Log the `report` run into the sweep's group; returns the group (None without wandb)."""
    if logger.backend != "wandb" or not logger.enabled:
        return None
    group = sweep_group(payload, sweep)
    sweep = Path(sweep).resolve()
    lrs = sorted({c.get("lr") for c in payload.get("cells") or [] if isinstance(c.get("lr"), (int, float))})
    config = {"sweep": str(sweep), "lrs": [fmt_lr(lr) for lr in lrs],
              "objectives": sorted({str(c.get("objective")) for c in payload.get("cells") or []})}
    logger.start("report", f"report-{sweep.parent.name}-{sweep.name}", home=home, job_type="report", group=group,
                 config=config, identity={"cell": None, "sweep": str(sweep)})
    logger.log_table("report/cells", *cells_table(payload), step=0)
    effect_columns, effect_rows = effects_table(payload)
    if effect_rows:
        logger.log_table("report/effects", effect_columns, effect_rows, step=0)
    for name, path in plot_files(payload).items():
        logger.log_image(f"report/{name}", path, step=0)
    logger.summary({f"report/{key}": payload[key] for key in ("n_cells", "n_runs", "n_failed_runs", "n_failed_cells")
                    if key in payload})
    logger.finish()
    return group
