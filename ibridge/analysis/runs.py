"""A sweep folder's runs and cells: what `ibridge report` reads, before any table or plot.

A sweep folder holds one run folder per Hydra job, each with ``results.json`` (written
last by the CLI) and usually ``config.yaml``. A run is identified by its SFT objective,
SFT learning rate, seed and its other overrides (``key=value``). A *cell* is every run
that agrees on all of these but the seed; which other keys split cells is not listed
anywhere: it is whichever overrides vary across the sweep (``objective.beta``,
``dpo.lr``, ``model.pretrain.seed``, ...), so any grid needs no new code.

Only completed runs enter a cell's numbers (mean ± standard error over its seeds, by
pandas); failed runs, and run folders without ``results.json`` (killed or still
running), are kept with their error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from ibridge.sweep_layout import is_report_run

__all__ = [
    "Cell", "Run", "build_cells", "fmt_lr", "load_runs", "lr_order", "newest_sweep", "one_line",
    "run_value", "select", "value_order", "varying_keys", "varying_label",
]

# Overrides that identify a run's SFT objective / lr / seed; every other override is
# in `Run.settings`, and those that differ between runs split cells.
IDENTITY_KEYS = ("objective", "lr", "seed")


@dataclass
class Run:
    path: Path
    status: str  # completed | failed | incomplete (no results.json) | whatever the file says
    error: str | None
    objective: str
    lr: float | str | None
    seed: int
    settings: dict[str, str]  # the other overrides, key -> canonical value (numbers as in `_canonical`)
    granularity: str | None = None  # objective.granularity of f-divergence objectives, where known
    results: dict = field(default_factory=dict, repr=False)

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def extra(self) -> tuple[str, ...]:
        """The other overrides as sorted ``key=value`` strings."""
        return tuple(f"{key}={self.settings[key]}" for key in sorted(self.settings))


# --------------------------------------------------------------------------- values


def _canonical(value) -> str:
    """One spelling per override value: 1e-3, 1.0e-3 and 0.001 are one cell; words stay as they are."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return f"{number:.10g}" if math.isfinite(number) else text


def value_order(value) -> tuple:
    """Numbers in numeric order before words (None last)."""
    if value is None:
        return (2, 0.0, "")
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def lr_order(lr) -> tuple:
    return value_order(lr)


def fmt_lr(lr) -> str:
    return "—" if lr is None else (f"{lr:g}" if isinstance(lr, float) else str(lr))


def one_line(text: str) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- loading


def _read_yaml(path: Path) -> dict | list | None:
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None


def select(tree, dotted: str):
    """``tree["a"]["b"]`` for ``"a.b"``; None where a part is missing."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    parsed = {}
    for item in overrides or ():
        key, sep, value = str(item).partition("=")
        if sep:
            parsed[key.lstrip("+~")] = value
    return parsed


def _as_lr(value) -> float | str | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(f"{float(value):.10g}")  # 1e-3, "1.0e-3" and 0.001 are one cell
    except (TypeError, ValueError):
        return str(value)


def _as_seed(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _first(*values):
    return next((v for v in values if v is not None and v != ""), None)


def _identify(run_dir: Path, results: dict) -> dict:
    """Run fields from stage records, then config.yaml, Hydra's composed config, then overrides."""
    config = _read_yaml(run_dir / "config.yaml") or {}
    composed = _read_yaml(run_dir / ".hydra" / "config.yaml") or {}  # written by Hydra before validation
    overrides = results.get("overrides")
    if overrides is None:
        overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml") or []
    parsed = _parse_overrides(overrides)
    sft = (results.get("stages") or {}).get("sft") or {}
    objective = _first(sft.get("objective"), select(config, "objective.name"),
                       select(composed, "objective.name"), parsed.get("objective"), "sft")
    lr = _as_lr(_first(sft.get("lr"), select(config, "lr"), select(composed, "lr"), parsed.get("lr")))
    seed = _as_seed(_first(select(config, "seed"), select(composed, "seed"), parsed.get("seed")))
    granularity = _first(parsed.get("objective.granularity"), select(config, "objective.granularity"),
                         select(composed, "objective.granularity"))
    return {
        "objective": str(objective), "lr": lr, "seed": 0 if seed is None else seed,
        "settings": {key: _canonical(value) for key, value in parsed.items() if key not in IDENTITY_KEYS},
        "granularity": None if granularity is None else str(granularity),
    }


def load_runs(sweep_dir: Path) -> list[Run]:
    """Every run under `sweep_dir`: each results.json, and each Hydra job folder without one."""
    sweep_dir = Path(sweep_dir)
    runs = []
    reports = set()
    for path in sorted(sweep_dir.rglob("results.json")):
        if is_report_run(path.parent):  # the sweep's own report run, not a cell
            reports.add(path.parent)
            continue
        try:
            results = json.loads(path.read_text())
            if not isinstance(results, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            results = {"status": "failed", "error": f"unreadable results.json: {err}"}
        status = str(results.get("status", "unknown"))
        error = results.get("error")
        if status != "completed" and not error:
            error = f"status {status!r} without an error message"
        runs.append(Run(path.parent, status, error, **_identify(path.parent, results), results=results))
    seen = {run.path for run in runs} | reports
    for path in sorted(sweep_dir.rglob("overrides.yaml")):
        run_dir = path.parent.parent
        if path.parent.name != ".hydra" or run_dir in seen or any(p in seen for p in run_dir.parents):
            continue
        if is_report_run(run_dir):  # a report running now
            continue
        error = "no results.json: the run was killed or is still running"
        runs.append(Run(run_dir, "incomplete", error, **_identify(run_dir, {}), results={}))
    return runs


def _sweep_of(results_json: Path, root: Path) -> Path:
    """The sweep folder a results.json belongs to: the one with Hydra's multirun.yaml."""
    for folder in results_json.parents:
        if (folder / "multirun.yaml").is_file():
            return folder
        if folder == root:
            break
    parts = results_json.relative_to(root).parts  # <date>/<time>/<cell>/results.json
    if len(parts) >= 4:
        return root / parts[0] / parts[1]
    if len(parts) == 3:
        return root / parts[0]
    return root


def newest_sweep(root: Path = Path("multirun")) -> Path:
    """The most recently modified sweep folder under `root` with results.json files below it."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}/ does not exist: run a sweep first (ibridge -m ...) or name one")
    latest: dict[Path, float] = {}
    for results_json in root.rglob("results.json"):
        if is_report_run(results_json.parent):
            continue
        sweep = _sweep_of(results_json, root)
        mtime = max(results_json.stat().st_mtime, sweep.stat().st_mtime)
        latest[sweep] = max(latest.get(sweep, mtime), mtime)
    if not latest:
        raise FileNotFoundError(f"no results.json under {root}/: run a sweep first (ibridge -m ...) or name one")
    return max(latest, key=lambda sweep: (latest[sweep], str(sweep)))


# --------------------------------------------------------------------------- metrics of a run


def _numbers(mapping) -> dict[str, float]:
    if not isinstance(mapping, dict):
        return {}
    return {k: float(v) for k, v in mapping.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def run_scalars(results: dict) -> dict:
    """``{"eval": {stage: {metric: value}}, "train": {stage: {key: value}}}``: a run's finite numbers."""
    by_stage = dict(results.get("eval_by_stage") or {})
    if "dpo" not in by_stage and results.get("eval") and results.get("job", "pipeline") == "pipeline":
        by_stage["dpo"] = results["eval"]  # `eval` is the post-DPO model's
    return {
        "eval": {stage: _numbers(metrics) for stage, metrics in by_stage.items()},
        "train": {stage: _numbers(record) for stage, record in (results.get("stages") or {}).items()},
    }


def run_value(run: Run, metric: str) -> float | None:
    """One number of a run, ``metric`` = ``"<group>.<stage>.<name>"`` (e.g. ``eval.dpo.win_rate``)."""
    group, stage, name = metric.split(".")
    return run_scalars(run.results).get(group, {}).get(stage, {}).get(name)


# --------------------------------------------------------------------------- cells


@dataclass
class Cell:
    objective: str
    lr: float | str | None
    settings: dict[str, str]
    runs: list[Run] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # group -> stage -> metric -> {mean, se, n}

    @property
    def extra(self) -> tuple[str, ...]:
        return tuple(f"{key}={self.settings[key]}" for key in sorted(self.settings))

    @property
    def completed(self) -> list[Run]:
        return [run for run in self.runs if run.completed]

    @property
    def failed(self) -> list[Run]:
        return [run for run in self.runs if not run.completed]

    @property
    def status(self) -> str:
        if not self.failed:
            return "ok"
        if not self.completed:
            return "failed"
        return f"{len(self.failed)}/{len(self.runs)} failed"

    @property
    def error(self) -> str | None:
        errors = list(dict.fromkeys(one_line(run.error or "") for run in self.failed))
        if not errors:
            return None
        return errors[0] + (f" (+{len(errors) - 1} other errors)" if len(errors) > 1 else "")

    def stat(self, key: str) -> dict | None:
        return select(self.metrics, key)


def _aggregate(cells: list[Cell]) -> None:
    """Each cell's ``metrics[group][stage][name] = {mean, se, n}`` over its completed runs."""
    rows = [(i, group, stage, name, value)
            for i, cell in enumerate(cells) for run in cell.completed
            for group, stages in run_scalars(run.results).items()
            for stage, metrics in stages.items() for name, value in metrics.items()]
    if not rows:
        return
    frame = pd.DataFrame(rows, columns=["cell", "group", "stage", "name", "value"])
    # sem: std(ddof=1) / sqrt(n), NaN for one value (shown as just the mean)
    table = frame.groupby(["cell", "group", "stage", "name"], sort=False)["value"].agg(["mean", "sem", "count"])
    for (i, group, stage, name), (mean, se, n) in table.iterrows():
        cells[i].metrics.setdefault(group, {}).setdefault(stage, {})[name] = {
            "mean": float(mean), "se": float(se) if math.isfinite(se) else None, "n": int(n),
        }


def build_cells(runs: list[Run]) -> list[Cell]:
    """The runs grouped by everything but the seed, in order of objective, lr, then the other keys."""
    cells: dict[tuple, Cell] = {}
    for run in runs:
        key = (run.objective, run.lr, run.extra)
        cells.setdefault(key, Cell(run.objective, run.lr, dict(run.settings))).runs.append(run)
    keys = sorted({key for cell in cells.values() for key in cell.settings})
    ordered = sorted(cells.values(), key=lambda c: (c.objective, lr_order(c.lr),
                                                    tuple(value_order(c.settings.get(k)) for k in keys)))
    for cell in ordered:
        cell.runs.sort(key=lambda run: (run.seed, str(run.path)))
    _aggregate(ordered)
    return ordered


def varying_keys(items: Sequence[Cell] | Sequence[Run]) -> list[str]:
    """The override keys (beyond objective, lr and seed) whose value differs between `items`."""
    keys = sorted({key for item in items for key in item.settings})
    return [key for key in keys if len({item.settings.get(key) for item in items}) > 1]


def varying_label(item: Cell | Run, keys: Iterable[str]) -> str:
    """``"k1=v1,k2=v2"`` over `keys` ("" for none; a key the item lacks reads ``k=—``)."""
    return ",".join(f"{key}={item.settings.get(key, '—')}" for key in keys)
