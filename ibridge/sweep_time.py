"""How long a sweep will take, before it starts, and where the figure comes from.

From past runs when there are some: the median ``runtime_s`` of the completed runs under
``multirun/`` and ``outputs/`` of the same job whose overrides differ from a cell's only in
keys that do not change the time (seeds, learning rates, objectives and their settings, the
logger). Otherwise, for toy pipelines, from the toy timings README.md reports for 2 cores:
about 14 s a default pipeline with its base model cached and 26 s to pretrain a base model
that is not, about 10 s a ``debug=smoke`` pipeline (whose base pretrains in about 1 s: 0.89 s
in the ``ibridge_base.json`` of one build). Otherwise it says there is no estimate. A
sweep's cells run one at a time unless the launcher runs several
(``hydra/launcher=parallel``: ``n_jobs``). The estimate is rough: the same run takes longer
on a busy machine, and the objectives that run the reference model in every step (sft_kl,
asft) take about a third longer (README.md, "Objective cost").
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

PAST_RUN_ROOTS = (Path("multirun"), Path("outputs"))
# Keys whose value does not change how long a run takes (with their sub-keys).
TIME_NEUTRAL = ("seed", "lr", "dpo.lr", "objective", "dpo.objective", "objective@dpo.objective",
                "model.pretrain.seed", "grid", "logger", "hydra", "resume", "report", "dashboard", "judge.path")
# README.md, "Time" (2 cores, base model cached) and its `debug=smoke` line; building a base is
# extra, once per base (26 s; a smoke base pretrains in 0.89 s).
TOY_PIPELINE_S = {"none": 14.0, "smoke": 10.0}
TOY_BASE_BUILD_S = {"none": 26.0, "smoke": 1.0}


def _neutral(key: str) -> bool:
    key = key.lstrip("+~")
    return any(key == k or key.startswith((f"{k}.", f"{k}/")) for k in TIME_NEUTRAL)


def shape(job: str, overrides: list[str]) -> tuple:
    """What a run's time depends on: its job and the overrides that change the time."""
    kept = sorted(o for o in overrides if "=" in o and not _neutral(o.split("=", 1)[0]) and not o.startswith("job="))
    return job, tuple(kept)


def _job(overrides: list[str]) -> str:
    return next((o.split("=", 1)[1] for o in overrides if o.startswith("job=")), "pipeline")


def past_runtimes(roots=PAST_RUN_ROOTS) -> dict[tuple, list[float]]:
    """Runtimes of completed past runs, by :func:`shape`."""
    found: dict[tuple, list[float]] = {}
    for root in roots:
        for path in Path(root).rglob("results.json") if Path(root).is_dir() else ():
            try:
                results = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            seconds = results.get("runtime_s")
            if results.get("status") != "completed" or not isinstance(seconds, (int, float)) or seconds <= 0:
                continue
            key = shape(str(results.get("job", "pipeline")), list(results.get("overrides") or []))
            found.setdefault(key, []).append(float(seconds))
    return found


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 2 * 3600 else f"{seconds / 3600:.1f} h"


def _uncached_bases(configs: dict) -> int:
    """Toy base models the sweep needs that are not in the cache yet (among the checked cells)."""
    from ibridge.models import READY_MARKER, cache_root, toy_base_key
    from ibridge.world import WorldConfig

    keys = set()
    for cfg in configs.values():
        if cfg.model.kind != "toy" or cfg.model.get("name_or_path"):
            continue
        world = WorldConfig.from_mapping(cfg.data.world) if cfg.data.kind == "toy" else WorldConfig()
        folder = cache_root(cfg.model) / "base" / toy_base_key(cfg.model, world)
        if not (folder / READY_MARKER).is_file():
            keys.add(folder)
    return len(keys)


def _toy_seconds(cells: list[list[str]], configs: dict, debug: str) -> float | None:
    """The toy timings' figure for a cell, or None when they do not cover it."""
    if debug not in TOY_PIPELINE_S or not configs:
        return None
    cfg = next(iter(configs.values()))
    if _job(cells[0]) != "pipeline" or cfg.model.kind != "toy" or cfg.data.kind != "toy":
        return None
    touched = {o.split("=", 1)[0].lstrip("+~") for cell in cells for o in cell if not _neutral(o.split("=", 1)[0])}
    if touched - {"debug", "job", "trainer.num_threads"}:
        return None  # epochs, batch sizes, architecture, world ...: not what the toy timings measured
    return TOY_PIPELINE_S[debug]


def estimate(cells: list[list[str]], configs: dict, hydra_cfg: dict) -> str:
    """``est. 8.4 min (14 s a cell: toy timings, README.md; one cell at a time)`` or why there is none."""
    past = past_runtimes()
    per_cell, sources = [], set()
    for cell in cells:
        runs = past.get(shape(_job(cell), cell))
        if runs:
            per_cell.append(statistics.median(runs))
            sources.add("past")
        else:
            per_cell.append(None)
    debug = next((o.split("=", 1)[1] for o in cells[0] if o.startswith("debug=")), "none") if cells else "none"
    if any(s is None for s in per_cell):
        toy = _toy_seconds(cells, configs, debug)
        if toy is None:
            return "no time estimate (no completed run like these under multirun/ or outputs/, and the toy " \
                   "timings cover only toy pipelines)"
        per_cell = [toy if s is None else s for s in per_cell]
        sources.add("toy")
    builds = _uncached_bases(configs)
    jobs = int(getattr(hydra_cfg.get("launcher"), "n_jobs", 1) or 1) if hydra_cfg.get("launcher") else 1
    total = sum(per_cell) / max(jobs, 1) + builds * TOY_BASE_BUILD_S.get(debug, TOY_BASE_BUILD_S["none"])
    typical = statistics.median(per_cell)
    where = " and ".join(
        {"past": "past runs like these under multirun/ and outputs/", "toy": "toy timings, README.md"}[s]
        for s in sorted(sources))
    extra = f", {builds} base model{'s' * (builds != 1)} to build" if builds else ""
    pace = "one cell at a time" if jobs <= 1 else f"{jobs} cells at a time"
    return f"est. {_duration(total)} ({_duration(typical)} a cell from {where}{extra}; {pace})"
