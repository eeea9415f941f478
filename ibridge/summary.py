"""What a run produced, on the terminal: a compact table at the end of every job and sweep.

A `pipeline`, `train` or `eval` run prints one row per stage (gold reward, win rate
with its 95% CI, KL to the reference, implicit-reward accuracy, steps, runtime) and
where its files are; a sweep prints one line per cell and points to `ibridge report`
(:class:`SweepSummary`, a Hydra callback that runs when the whole sweep has ended).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ibridge.judging.display import judged, print_judged
from ibridge.naming import fmt_lr

STAGE_ORDER = ("base", "checkpoint", "sft", "dpo")


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 120, highlight=False)


def _num(value, fmt: str = ".3f") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—"
    return format(value, fmt)


def _win_rate(metrics: dict) -> str:
    text = _num(metrics.get("win_rate"))
    ci = metrics.get("win_rate_ci")
    if text != "—" and isinstance(ci, (list, tuple)) and len(ci) == 2:
        text += f" [{_num(ci[0], '.2f')}, {_num(ci[1], '.2f')}]"
    return text


def _runtime(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "—"
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def stage_table(results: dict) -> Table:
    """One row per evaluated or trained stage of a run's results.json."""
    evals = dict(results.get("eval_by_stage") or {})
    if not evals and results.get("eval") and results.get("job") == "eval":
        evals["checkpoint"] = results["eval"]
    stages = results.get("stages") or {}
    names = [s for s in STAGE_ORDER if s in evals or s in stages]
    names += [s for s in {**evals, **stages} if s not in names]
    table = Table(title=f"{results.get('job', 'run')} — {results.get('status', '?')}", title_justify="left")
    win_rate = "judged win rate [95% CI]" if judged(evals.values()) else "win rate [95% CI]"  # judge=alpaca_eval
    for header in ("stage", "gold reward", win_rate, "KL to ref", "impl. acc", "KL/token", "steps", "runtime"):
        table.add_column(header, justify="left" if header == "stage" else "right", no_wrap=True)
    for name in names:
        ev, st = evals.get(name) or {}, stages.get(name) or {}
        label = name if not st.get("objective") else f"{name} ({st['objective']}, lr {fmt_lr(st.get('lr'))})"
        table.add_row(escape(label), _num(ev.get("gold_reward", ev.get("reward"))), _win_rate(ev),
                      _num(ev.get("kl_to_ref")), _num(ev.get("implicit_reward_acc")), _num(st.get("kl_token")),
                      str(st.get("steps", "—")), _runtime(st.get("runtime_s")))
    return table


def _files(results: dict) -> list[tuple[str, str]]:
    run_dir = Path(results.get("run_dir", "."))
    files = [("run folder", str(run_dir)), ("results", str(run_dir / "results.json"))]
    for stage, record in (results.get("stages") or {}).items():
        if record.get("checkpoint"):
            files.append((f"{stage} checkpoint", record["checkpoint"]))
    if (run_dir / "eval").is_dir():
        files.append(("generations", str(run_dir / "eval" / "<stage>" / "generations.jsonl")))
    if (run_dir / "metrics.jsonl").is_file():
        files.append(("metrics", str(run_dir / "metrics.jsonl")))
    if list((run_dir / "wandb").glob("offline-run-*")):
        files.append(("wandb (offline)", f"wandb sync {run_dir / 'wandb'}/offline-run-*"))
    report = results.get("report")
    if isinstance(report, dict) and report.get("path"):
        files.append(("report", report["path"]))
    return files


def print_run(results: dict, console: Console | None = None) -> None:
    """The table of one run and where its files are."""
    console = console or _console()
    if results.get("stages") or results.get("eval_by_stage") or results.get("eval"):
        console.print(stage_table(results))
        print_judged(results, console)  # judge=alpaca_eval: judged and gold win rates side by side
    if results.get("status") != "completed" and results.get("error"):
        console.print(f"[red]error: {escape(str(results['error']))}[/red]")
    width = max(len(label) for label, _ in _files(results))
    for label, path in _files(results):
        console.print(f"  {label:<{width}}  {escape(path)}")


def sweep_table(sweep_dir: Path) -> Table:
    """One line per cell of a sweep folder (what its results.json files say), named by
    the overrides that vary between cells."""
    cells = []
    for path in _cell_results(sweep_dir):
        try:
            cells.append((path, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as err:
            cells.append((path, {"status": "unreadable", "error": str(err)}))
    common = set.intersection(*(set(r.get("overrides") or []) for _, r in cells)) if cells else set()
    table = Table(title=f"sweep {sweep_dir}", title_justify="left")
    for header in ("#", "cell", "status", "sft win rate", "dpo win rate [95% CI]", "dpo gold", "dpo KL",
                   "runtime"):
        table.add_column(header, justify="left" if header in ("cell", "status") else "right",
                         no_wrap=header != "status", overflow="fold", max_width=48 if header == "status" else None)
    for path, results in cells:
        evals = results.get("eval_by_stage") or {}
        varying = [o for o in results.get("overrides") or [] if o not in common]
        label = ",".join(varying) or results.get("cell") or path.parent.name
        status = results.get("status", "?")
        if status != "completed":
            status = f"[red]{escape(status)}: {escape(str(results.get('error', ''))[:80])}[/red]"
        dpo = evals.get("dpo") or {}
        table.add_row(path.parent.name.split("_", 1)[0], escape(label), status,
                      _num((evals.get("sft") or {}).get("win_rate")), _win_rate(dpo), _num(dpo.get("gold_reward")),
                      _num(dpo.get("kl_to_ref")), _runtime(results.get("runtime_s")))
    return table


def _seed(results: dict) -> str:
    if results.get("seed") is not None:
        return str(results["seed"])
    for override in results.get("overrides") or []:
        if override.startswith("seed="):
            return override.split("=", 1)[1]
    return "—"


def _cell_results(sweep_dir: Path) -> list[Path]:
    def order(path: Path):
        head = path.parent.name.split("_", 1)[0]
        return (int(head), "") if head.isdigit() else (1 << 30, path.parent.name)

    return sorted(Path(sweep_dir).glob("*/results.json"), key=order)


def print_sweep(sweep_dir: Path, console: Console | None = None) -> None:
    console = console or _console()
    if not _cell_results(sweep_dir):
        return
    console.print(sweep_table(sweep_dir))
    console.print(f"next: ibridge report report.path={escape(str(sweep_dir))}   (tables, plots, paired effects)")
    if list(Path(sweep_dir).glob("*/wandb/offline-run-*")):
        console.print(f"wandb: wandb sync {escape(str(sweep_dir))}/*/wandb/offline-run-*")


def progress_line(config, job_return, job_started: float | None, sweep_started: float | None) -> str:
    """``ibridge: cell #3 completed in 85 s (sweep 4.2 min): <overrides> | dpo win rate 0.482, gold 0.737``."""
    now = time.perf_counter()
    hydra_cfg = getattr(job_return, "hydra_cfg", None) or {}
    num = OmegaConf.select(hydra_cfg, "hydra.job.num", default="?")
    out = OmegaConf.select(hydra_cfg, "hydra.runtime.output_dir", default=None)
    results: dict = {}
    if out and (Path(out) / "results.json").is_file():
        results = json.loads((Path(out) / "results.json").read_text())
    status = results.get("status") or getattr(getattr(job_return, "status", None), "name", "?").lower()
    dpo = (results.get("eval_by_stage") or {}).get("dpo") or {}
    took = "" if job_started is None else f" in {_runtime(now - job_started)}"
    total = "" if sweep_started is None else f" (sweep {_runtime(now - sweep_started)})"
    scores = f" | dpo win rate {_num(dpo.get('win_rate'))}, gold {_num(dpo.get('gold_reward'))}" if dpo else ""
    overrides = ",".join(getattr(job_return, "overrides", None) or [])
    return f"ibridge: cell #{num} {status}{took}{total}: {overrides}{scores}"


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency
    Callback = object


class SweepSummary(Callback):
    """Hydra callback (conf/config.yaml, hydra.callbacks): a progress line as each cell ends
    (Hydra's launcher prints one as each starts) and the sweep's table once every cell ended."""

    def on_multirun_start(self, config, **kwargs) -> None:
        self._started = time.perf_counter()

    def on_job_start(self, config, **kwargs) -> None:
        self._job_started = time.perf_counter()

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if getattr(self, "_started", None) is None:
            return  # a single run (not a sweep) prints its own table
        try:
            print(progress_line(config, job_return, getattr(self, "_job_started", None), self._started),
                  flush=True)
        except Exception as err:  # progress output must never fail a cell
            print(f"ibridge: could not print the cell's progress line: {err}", file=sys.stderr)

    def on_multirun_end(self, config, **kwargs) -> None:
        try:
            print_sweep(Path(str(config.hydra.sweep.dir)))
        except Exception as err:  # a summary must never turn a finished sweep into a failure
            print(f"ibridge: could not print the sweep summary: {err}", file=sys.stderr)
