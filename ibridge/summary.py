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
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ibridge.job_summaries import job_files, job_tables
from ibridge.judging.display import judged, print_judged
from ibridge.naming import fmt_lr
from ibridge.terminal import width as terminal_width
from ibridge.terminal import wrap

# Labels the numbers of a run made with a debug preset (debug=smoke): a tiny world and model.
SMOKE_NOTE = "smoke test (debug={}): a tiny world and model; its numbers say nothing about the method"

STAGE_ORDER = ("base", "checkpoint", "sft", "dpo")


def _console() -> Console:
    return Console(width=terminal_width(), highlight=False)


def _num(value, fmt: str = ".3f") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—"
    return format(value, fmt)


def _win_rate(metrics: dict) -> str:
    text = _num(metrics.get("win_rate"))
    ci = metrics.get("win_rate_ci")
    if text != "—" and isinstance(ci, (list, tuple)) and len(ci) == 2:
        text += f" [{_num(ci[0], '.2f')},{_num(ci[1], '.2f')}]"  # no space inside: a narrow column breaks before "["
    return text


def _runtime(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "—"
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _title(results: dict) -> str:
    title = f"{results.get('job', 'run')} — {results.get('status', '?')}"
    if results.get("debug"):
        title += " — " + SMOKE_NOTE.format(results["debug"])
    return title


def _number_column(table: Table, header: str, values: list[str]) -> None:
    """A right-aligned column whose numbers are never wrapped or cut; its header may wrap."""
    table.add_column(header, justify="right", no_wrap=False, overflow="fold",
                     min_width=max([len(v) for v in values] + [4]))


def stage_table(results: dict) -> Table:
    """One row per evaluated or trained stage of a run's results.json, in 80 columns: short
    headers (the legend follows in the caption), the CI under the win rate when narrow."""
    evals = dict(results.get("eval_by_stage") or {})
    if not evals and results.get("eval") and results.get("job") == "eval":
        evals["checkpoint"] = results["eval"]
    stages = results.get("stages") or {}
    names = [s for s in STAGE_ORDER if s in evals or s in stages]
    names += [s for s in {**evals, **stages} if s not in names]
    rows = []
    for name in names:
        ev, st = evals.get(name) or {}, stages.get(name) or {}
        label = name if not st.get("objective") else f"{name}: {st['objective']}, {fmt_lr(st.get('lr'))}"
        rows.append([label, _num(ev.get("gold_reward", ev.get("reward"))), _win_rate(ev), _num(ev.get("kl_to_ref")),
                     _num(ev.get("implicit_reward_acc")), _num(st.get("kl_token")), str(st.get("steps", "—")),
                     _runtime(st.get("runtime_s"))])
    win = "judged win [95% CI]" if judged(evals.values()) else "win [95% CI]"  # judge=alpaca_eval
    table = Table(title=_title(results), title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  pad_edge=False, padding=(0, 1, 0, 0), caption_justify="left",
                  caption=f"stage: objective, lr; gold: gold reward; {win}: win rate against the reference "
                          "outputs; KL: sampled KL to the reference; acc: implicit-reward accuracy; KL/tok: kl/token "
                          "(held-out)")
    table.add_column("stage", overflow="fold", min_width=5)
    for i, header in enumerate(("gold", win, "KL", "acc", "KL/tok", "steps", "time"), start=1):
        values = [row[i] for row in rows]
        if header == win:  # "0.480 [0.42, 0.54]" may break before its interval, never inside a number
            table.add_column(header, justify="right", min_width=max([len(v.split(" [")[0]) for v in values] + [12]))
        else:
            _number_column(table, header, values)
    for row in rows:
        table.add_row(*(escape(value) for value in row))
    return table


def _files(results: dict) -> list[tuple[str, str]]:
    run_dir = Path(results.get("run_dir", "."))
    files = [("run folder", str(run_dir)), ("results", str(run_dir / "results.json"))]
    for stage, record in (results.get("stages") or {}).items():
        if record.get("checkpoint"):
            files.append((f"{stage} checkpoint", record["checkpoint"]))
        if record.get("adapter"):
            files.append((f"{stage} LoRA adapter", record["adapter"]))
    if (run_dir / "eval").is_dir():
        files.append(("generations", str(run_dir / "eval" / "<stage>" / "generations.jsonl")))
    if (run_dir / "metrics.jsonl").is_file():
        files.append(("metrics", str(run_dir / "metrics.jsonl")))
    if list((run_dir / "wandb").glob("offline-run-*")):
        files.append(("wandb (offline)", f"wandb sync {run_dir / 'wandb'}/offline-run-*"))
    report = results.get("report")
    if isinstance(report, dict) and report.get("path"):
        files.append(("report", report["path"]))
    files += job_files(results)
    return files


def print_files(files: list[tuple[str, str]], console: Console) -> None:
    """``  label  path``, the path on a line of its own when both do not fit: never broken."""
    width = max(len(label) for label, _ in files)
    for label, path in files:
        line = f"  {label:<{width}}  {path}"
        if len(line) > console.width:
            console.print(f"  {label}:", soft_wrap=True)
            console.print(f"    {escape(path)}", soft_wrap=True)
        else:
            console.print(f"  {label:<{width}}  {escape(path)}", soft_wrap=True)


def print_run(results: dict, console: Console | None = None) -> None:
    """The table of one run and where its files are."""
    console = console or _console()
    if results.get("stages") or results.get("eval_by_stage") or results.get("eval"):
        console.print(stage_table(results))
        print_judged(results, console)  # judge=alpaca_eval: judged and gold win rates side by side
    elif results.get("debug"):
        console.print(SMOKE_NOTE.format(results["debug"]))
    for table in job_tables(results):
        console.print(table)
    if results.get("status") != "completed" and results.get("error"):
        console.print(f"[red]error: {escape(str(results['error']))}[/red]")
    print_files(_files(results), console)


def sweep_table(sweep_dir: Path) -> Table:
    """One line per cell of a sweep folder (what its results.json files say), named by
    the overrides that vary between cells; fits 80 columns (the cell and status wrap)."""
    cells = []
    for path in _cell_results(sweep_dir):
        try:
            cells.append((path, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as err:
            cells.append((path, {"status": "unreadable", "error": str(err)}))
    common = set.intersection(*(set(r.get("overrides") or []) for _, r in cells)) if cells else set()
    smoke = next((r.get("debug") for _, r in cells if r.get("debug")), None)
    title = f"sweep {sweep_dir}" + (f" — {SMOKE_NOTE.format(smoke)}" if smoke else "")
    rows = []
    for path, results in cells:
        evals = results.get("eval_by_stage") or {}
        varying = [o for o in results.get("overrides") or [] if o not in common]
        label = " ".join(varying) or results.get("cell") or path.parent.name
        status = results.get("status", "?")
        if status != "completed":
            status = f"[red]{escape(status)}: {escape(str(results.get('error', ''))[:80])}[/red]"
        status += requeue_note(results)
        dpo = evals.get("dpo") or {}
        rows.append([path.parent.name.split("_", 1)[0], escape(label), status,
                     _num((evals.get("sft") or {}).get("win_rate")), _win_rate(dpo), _num(dpo.get("gold_reward")),
                     _num(dpo.get("kl_to_ref")), _runtime(results.get("runtime_s"))])
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  padding=(0, 1, 0, 0))
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("cell", overflow="fold", min_width=8)
    table.add_column("status", overflow="fold", min_width=9, max_width=40)
    for i, header in enumerate(("SFT win", "DPO win\n[95% CI]", "DPO gold", "DPO KL", "time"), start=3):
        values = [row[i] for row in rows]
        if header.startswith("DPO win"):
            table.add_column(header, justify="right", min_width=max([len(v.split(" [")[0]) for v in values] + [12]))
        else:
            _number_column(table, header, values)
    for row in rows:
        table.add_row(*row)
    return table


def requeue_note(results: dict) -> str:
    """`` (requeued 2x)`` for a Slurm cell that was requeued (time limit, preemption), else empty."""
    count = results.get("requeues") or 0
    return f" (requeued {count}x)" if isinstance(count, int) and count > 0 else ""


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
    print_files([("next", f"ibridge report report.path={sweep_dir}")], console)
    if list(Path(sweep_dir).glob("*/wandb/offline-run-*")):
        print_files([("wandb", f"wandb sync {sweep_dir}/*/wandb/offline-run-*")], console)


def progress_line(config, job_return, job_started: float | None, sweep_started: float | None,
                  width: int | None = None) -> str:
    """A cell's lines as it ends, wrapped to the terminal's width between words::

        ibridge: cell #3 completed in 85 s (sweep 4.2 min) | dpo win rate 0.482, gold 0.737
            objective=jsd lr=1e-4 seed=0

    The cell's time is its results.json ``runtime_s`` (what the sweep table shows), and
    a cell that completed in an earlier attempt of the sweep says ``skipped``.
    """
    now = time.perf_counter()
    hydra_cfg = getattr(job_return, "hydra_cfg", None) or {}
    num = OmegaConf.select(hydra_cfg, "hydra.job.num", default="?")
    out = OmegaConf.select(hydra_cfg, "hydra.runtime.output_dir", default=None)
    results: dict = {}
    if out and (Path(out) / "results.json").is_file():
        results = json.loads((Path(out) / "results.json").read_text())
    status = results.get("status") or getattr(getattr(job_return, "status", None), "name", "?").lower()
    returned = _returned(job_return)
    if returned.get("skipped"):
        status, took = "skipped", " (completed earlier)"
    elif isinstance(results.get("runtime_s"), (int, float)):
        took = f" in {_runtime(results['runtime_s'])}"
    else:
        took = "" if job_started is None else f" in {_runtime(now - job_started)}"
    status += requeue_note(results)
    total = "" if sweep_started is None else f" (sweep {_runtime(now - sweep_started)})"
    dpo = (results.get("eval_by_stage") or {}).get("dpo") or {}
    scores = f" | dpo win rate {_num(dpo.get('win_rate'))}, gold {_num(dpo.get('gold_reward'))}" if dpo else ""
    overrides = " ".join(getattr(job_return, "overrides", None) or [])
    width = width or terminal_width()
    return "\n".join(wrap(f"ibridge: cell #{num} {status}{took}{total}{scores}", width)
                     + (wrap(overrides, width, indent="    ", subsequent="") if overrides else []))


def _returned(job_return) -> dict:
    """What the cell's task returned (ibridge.cli.run's results), when it completed."""
    try:
        value = job_return.return_value
    except Exception:  # a failed cell's return_value re-raises its error
        return {}
    return value if isinstance(value, dict) else {}


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
        from ibridge.launch_env import detect

        if detect().rank != 0:
            return  # a multi-rank cell: rank 0 speaks for it
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
