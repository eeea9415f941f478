"""Spawning workers, summarising their runs, and the tables and target lines both benchmarks print."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import ROOT, Spec, peak_rss_mb
from .workers import LABELS


def worker_main(args, workers: dict) -> None:
    """In a worker process: run one configuration and print its result as one JSON line."""
    spec = Spec(json.loads(args.spec.read_text()))
    if args.worker not in workers:
        raise SystemExit(f"unknown worker {args.worker}")
    result = workers[args.worker](spec)
    # A worker that reset the peak count between phases reports the largest phase peak itself.
    result["peak_rss_mb"] = max(peak_rss_mb(), result.pop("peak_process_mb", 0.0))
    print("RESULT " + json.dumps(result))


def spawn(script: Path, name: str, spec_file: Path, timeout: float = 900) -> dict:
    """Run worker `name` of `script` in a fresh process (its own peak memory), threads pinned."""
    threads = json.loads(spec_file.read_text()).get("threads", 0)
    pinned = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}
    env = dict(os.environ, **pinned, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=tempfile.mkdtemp(prefix="bench-hfds-"), TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(script), "--worker", name, "--spec", str(spec_file)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    raise RuntimeError(f"worker {name} failed (exit {proc.returncode}):\n{tail}")


def run_interleaved(script: Path, configs: list[str], spec_file: Path, repeats: int, wall: float,
                    more: dict[str, int] | None = None) -> dict:
    """Every configuration `repeats` times (`more[name]` for some), interleaved: a slow spell on the
    machine hits all alike."""
    counts = {name: (more or {}).get(name, repeats) for name in configs}
    rounds = max(counts.values(), default=0)
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for rep in range(rounds):
        for name in configs:
            if rep < counts[name]:
                runs[name].append(spawn(script, name, spec_file))
        print(f"  round {rep + 1}/{rounds} done ({time.perf_counter() - wall:.0f} s)", flush=True)
    return runs


def fmt_rate(x) -> str:
    return "-" if x is None else f"{x / 1000:7.2f}k"


def rates(run: dict) -> tuple[float | None, float]:
    whole = run["tokens"] / run["stage_s"] if run.get("stage_s") else None
    return whole, run["tokens"] / run["steps_s"]


def _median(runs, key):
    return statistics.median(run[key] for run in runs) if runs[0].get(key) else None


def summarise(runs: list[dict]) -> dict:
    whole = [r for r in (rates(run)[0] for run in runs) if r is not None]
    steps = [rates(run)[1] for run in runs]
    return {
        "whole_median": statistics.median(whole) if whole else None,
        "whole_best": max(whole) if whole else None,
        "steps_median": statistics.median(steps),
        "steps_best": max(steps),
        "peak_mb": statistics.median(run["peak_rss_mb"] for run in runs),
        "growth_mb": statistics.median(run["peak_rss_mb"] - run["rss_start_mb"] for run in runs),
        "tokens": runs[0]["tokens"],
        "steps": runs[0]["steps"],
        **{key: _median(runs, key) for key in ("stage_s", "ref_s", "prep_s", "steps_s")},
    }


def print_table(title: str, names: list[str], stats: dict) -> None:
    print(f"\n{title}")
    print(f"  {'configuration':<46} {'tokens':>7} {'whole stage tok/s':>19} {'steps only tok/s':>18} "
          f"{'peak RSS':>9} {'growth':>7}")
    print(f"  {'':<46} {'':>7} {'median    best':>19} {'median    best':>18} {'MiB':>9} {'MiB':>7}")
    for name in names:
        s = stats[name]
        print(f"  {LABELS[name]:<46} {s['tokens']:>7} {fmt_rate(s['whole_median'])} {fmt_rate(s['whole_best'])}"
              f"  {fmt_rate(s['steps_median'])} {fmt_rate(s['steps_best'])} {s['peak_mb']:>9.0f} "
              f"{s['growth_mb']:>7.0f}")


def print_breakdown(names: list[str], stats: dict) -> None:
    """Where a stage's time goes (medians, seconds)."""
    print(f"  where the time goes (median s): {'stage':>6} = {'before loop':>11} + {'steps':>6} + {'rest of loop':>12}"
          "   (before loop: tokenisation, reference pass, model/trainer setup; rest: collation, data loading, "
          "logging, callbacks)")
    for name in names:
        s = stats[name]
        if s["stage_s"] is None:
            continue
        rest = s["stage_s"] - s["prep_s"] - s["steps_s"]
        ref = f"   (reference pass {s['ref_s']:.2f} s)" if s["ref_s"] else ""
        print(f"    {LABELS[name]:<46} {s['stage_s']:6.2f} = {s['prep_s']:11.2f} + {s['steps_s']:6.2f} + "
              f"{rest:12.2f}{ref}")


class Targets:
    """Target lines (ratios of best runs, medians in brackets, or medians alone) and whether all are met."""

    def __init__(self, basis: str = "best"):
        self.lines: list[str] = []
        self.ok = True
        self.basis = basis  # which figure a throughput target reads: "best" or "median"

    def add(self, label: str, value: float, target: float, op: str = ">=", other: float | None = None) -> None:
        ok = value >= target if op == ">=" else value <= target
        extra = f" [{other:5.2f}x]" if other is not None else " " * 9
        self.lines.append(f"  {label:<60} {value:6.2f}x{extra}  (target {op} {target:.2f}x)  "
                          f"{'ok' if ok else 'MISSED'}")
        self.ok &= ok

    def throughput(self, label: str, ours: dict, other: dict, key: str, target: float) -> None:
        best = ours[f"{key}_best"] / other[f"{key}_best"]
        median = ours[f"{key}_median"] / other[f"{key}_median"]
        first, second = (best, median) if self.basis == "best" else (median, best)
        self.add(label, first, target, other=second)

    def memory(self, label: str, ours: dict, other: dict, target: float) -> None:
        self.add(label + " (medians)", ours["peak_mb"] / other["peak_mb"], target, "<=")

    def print(self, note: str) -> None:
        if self.lines:
            print(f"\nTargets ({note})")
            print("\n".join(self.lines))


def print_check(check: dict, tolerance: float) -> bool:
    """The correctness lines of `worker_check`; whether it passed."""
    worst = check["max_abs_diff"]
    ok = max(worst.values()) <= tolerance and not check["dpo_sequences_mismatched"] \
        and not check["sft_sequences_mismatched"]
    print(f"\nCorrectness on identical batches ({check['batches']} batches, policy != reference; ibridge forwards: "
          f"{', '.join(check['forwards'])}): {'ok' if ok else 'FAILED'}")
    print(f"  token sequences: DPO {check['dpo_sequences_mismatched']} mismatched, tokens ibridge/TRL "
          f"{check['dpo_tokens'][0]}/{check['dpo_tokens'][1]}; SFT {check['sft_sequences_mismatched']} mismatched, "
          f"tokens {check['sft_tokens'][0]}/{check['sft_tokens'][1]}")
    print("  max |ibridge - TRL|: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
          + f"  (tolerance {tolerance:g})")
    print("  DPO loss and rewards/*, largest |ibridge - TRL| by ibridge forward: "
          + ", ".join(f"{k} {v:.1e}" for k, v in check["dpo_max_abs_diff_by_forward"].items()))
    print("  last batch (ibridge, TRL): " + ", ".join(f"{k} ({a:.6f}, {b:.6f})"
                                                   for k, (a, b) in check["last_batch"].items()))
    return ok
