"""`ibridge dashboard`: a saved wandb Workspace and Report for a sweep (README "Dashboards").

Offline (the default) it writes ``<sweep>/dashboard/{workspace,report}.json``: what
``save()`` would upload. With ``logger.mode=online`` and ``logger.entity`` it saves
both and prints their URLs; ``dashboard.save=true`` while offline is a config error.
Needs the optional `wandb-workspaces` package (``pip install 'ibridge[dashboard]'``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from ibridge.config import ConfigError
from ibridge.io import write_json_atomic

log = logging.getLogger(__name__)

SWEEPS_ROOT = Path("multirun")


def axis_key(override_key: str) -> str | None:
    """Where an override's value sits in a cell run's config (:func:`ibridge.naming.cell_axes`)."""
    key = override_key.lstrip("+~")
    if key in ("objective", "objective.name"):
        return "objective"
    if key in ("dpo.objective", "dpo.objective.name"):
        return "dpo.objective"
    if key == "model.pretrain.seed":
        return "base_seed"
    if key.startswith("objective."):
        return "objective_settings." + key.split(".", 1)[1]
    if key.startswith("dpo.objective."):
        return "dpo.objective_settings." + key.split(".", 2)[2]
    return key


def swept_axes(sweep_dir: Path) -> list[str]:
    """``objective``, ``lr``, then every other override that differs between the sweep's
    cells (``seed`` excepted: seeds are what a group pools)."""
    from ibridge.naming import in_tag

    values: dict[str, set] = {}
    cells = sorted(Path(sweep_dir).glob("*/results.json"))
    for path in cells:
        try:
            overrides = json.loads(path.read_text()).get("overrides") or []
        except (OSError, json.JSONDecodeError):
            continue
        parsed = dict(o.split("=", 1) for o in overrides if "=" in o)
        for key in set(values) | set(parsed):
            values.setdefault(key, set()).add(parsed.get(key))
    axes = ["objective", "lr"]
    for key, seen in sorted(values.items()):
        name = axis_key(key)
        if len(seen) > 1 and in_tag(key) and name not in axes:
            axes.append(name)
    return axes


def judged_sweep(sweep_dir: Path) -> bool:
    """Whether some cell was evaluated with judge=alpaca_eval (its results carry the judge's tokens)."""
    for path in Path(sweep_dir).glob("*/results.json"):
        try:
            evals = json.loads(path.read_text()).get("eval_by_stage") or {}
        except (OSError, json.JSONDecodeError):
            continue
        if any("judge_tokens" in (metrics or {}) for metrics in evals.values()):
            return True
    return False


def _sweep_dir(cfg) -> Path:
    from ibridge.analysis.report import newest_sweep

    path = OmegaConf.select(cfg, "dashboard.path", default=None)
    if path is None:
        try:
            return newest_sweep(SWEEPS_ROOT)
        except FileNotFoundError as err:
            raise ConfigError(f"dashboard.path=null: {err}") from None
    sweep = Path(str(path)).expanduser()
    if not sweep.is_dir():
        raise ConfigError(f"dashboard.path={path}: no such folder")
    return sweep


def run(ctx) -> None:
    cfg = ctx.cfg
    mode = str(OmegaConf.select(cfg, "logger.mode", default="offline"))
    entity = OmegaConf.select(cfg, "logger.entity", default=None)
    save = OmegaConf.select(cfg, "dashboard.save", default=None)
    if save and (mode != "online" or not entity):
        raise ConfigError(f"dashboard.save=true needs logger.mode=online and logger.entity (got mode={mode}, "
                          f"entity={entity}); offline, ibridge dashboard writes the JSON that save() would upload")
    save = bool(mode == "online" and entity) if save is None else bool(save)
    try:
        import wandb_workspaces  # noqa: F401
    except ImportError:
        raise ConfigError("ibridge dashboard needs the wandb-workspaces package: pip install 'ibridge[dashboard]'") \
            from None
    from ibridge.analysis.wandb_report import sweep_group
    from ibridge.dashboard.spec import Sweep, build_report, build_workspace, report_payload, workspace_payload

    sweep_dir = _sweep_dir(cfg)
    if not list(sweep_dir.glob("*/results.json")):
        raise ConfigError(f"dashboard.path={sweep_dir}: no cell folder with a results.json below it")
    resolved = sweep_dir.resolve()
    sweep = Sweep(group=sweep_group({}, sweep_dir), axes=swept_axes(sweep_dir), entity=str(entity or ""),
                  project=str(OmegaConf.select(cfg, "logger.project", default="ibridge")),
                  title=OmegaConf.select(cfg, "dashboard.title", default=None)
                  or f"ibridge {resolved.parent.name}/{resolved.name}", judged=judged_sweep(sweep_dir))
    workspace, report = build_workspace(sweep), build_report(sweep, with_project=save)
    out_dir = sweep_dir / "dashboard"
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"workspace": out_dir / "workspace.json", "report": out_dir / "report.json"}
    write_json_atomic(files["workspace"], workspace_payload(workspace))
    write_json_atomic(files["report"], report_payload(report))
    record = {"sweep": str(sweep_dir), "group": sweep.group, "axes": sweep.axes, "saved": save,
              **{name: str(path) for name, path in files.items()}}
    if save:
        workspace.save()
        report.save()
        record.update(workspace_url=workspace.url, report_url=report.url)
        print(f"workspace: {workspace.url}\nreport:    {report.url}")
    else:
        print(f"dashboard specs (offline; `logger.mode=online logger.entity=...` saves them): {out_dir}")
    ctx.results["dashboard"] = record
