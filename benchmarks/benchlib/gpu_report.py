"""The GPU check's report: independent sections, one row each, a JSON file kept current, and a
one-screen verdict (benchmarks/gpu_check.py).

A section is a function returning ``(ok, detail, figures)``; whatever it raises (an error, an
out-of-memory) becomes its FAIL row, and the next section runs. Shared set-up that fails
(a model that cannot be built) fails every section that needs it, each with the reason.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

OK, FAIL, SKIP = "ok", "FAIL", "skip"


class Skipped(Exception):
    """Raised by a section that does not apply here (one GPU, a missing package): a skip row."""


class Report:
    """Rows of ``{model, check, status, ok, detail, seconds, **figures}``; written to `json_path`
    (atomically) after every row, so a run killed half-way still leaves its rows."""

    def __init__(self, header: dict, json_path: Path | None = None):
        self.header = dict(header)
        self.rows: list[dict] = []
        self.json_path = json_path
        self.started = time.perf_counter()
        self.write()

    def add(self, model: str, check: str, status: str, detail: str, **figures) -> None:
        row = {"model": model, "check": check, "status": status, "ok": status != FAIL, "detail": detail, **figures}
        self.rows.append(row)
        print(f"  [{status:<4}] {model:<6} {check:<30} {detail}", flush=True)
        self.write()

    def section(self, model: str, check: str, run: Callable[[], tuple]) -> None:
        """Run one section; its result, its skip or its exception becomes its row."""
        start = time.perf_counter()
        try:
            ok, detail, figures = run()
            status = OK if ok else FAIL
        except Skipped as why:
            status, detail, figures = SKIP, str(why), {}
        except BaseException as err:  # an OOM, an assertion, anything: this section's FAIL row
            if isinstance(err, KeyboardInterrupt):
                raise
            traceback.print_exc(file=sys.stderr)
            status, detail, figures = FAIL, _one_line(err), {"error": type(err).__name__}
        self.add(model, check, status, detail, seconds=round(time.perf_counter() - start, 2), **figures)
        release_memory()

    def failed(self) -> list[dict]:
        return [row for row in self.rows if row["status"] == FAIL]

    def write(self, **extra) -> None:
        if self.json_path is None:
            return
        self.header.update(extra)
        payload = {**self.header, "rows": self.rows, "seconds": round(time.perf_counter() - self.started, 1),
                   "passed": not self.failed()}
        tmp = self.json_path.with_name(self.json_path.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        os.replace(tmp, self.json_path)

    def verdict(self) -> str:
        """The whole outcome on one screen: the counts, then every FAIL and skip row, one line each."""
        counts = {status: sum(row["status"] == status for row in self.rows) for status in (OK, FAIL, SKIP)}
        width = max(60, min(shutil.get_terminal_size((120, 40)).columns, 160))
        lines = ["", "=" * width,
                 f"gpu_check verdict: {'FAIL' if counts[FAIL] else 'PASS'} - {counts[OK]} ok, {counts[FAIL]} FAIL, "
                 f"{counts[SKIP]} skipped, in {time.perf_counter() - self.started:.0f} s",
                 f"  {self.header.get('summary', '')}"]
        for row in self.rows:
            if row["status"] != OK:
                lines.append(f"  {row['status']:<4} {row['model']:<6} {row['check']:<30} {row['detail']}"[:width])
        if self.json_path is not None:
            lines.append(f"  JSON: {self.json_path}")
        lines.append("=" * width)
        return "\n".join(lines)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def release_memory() -> None:
    """Free what a finished section left (models, optimisers) before the next one measures."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def deterministic():
    """torch's deterministic algorithms inside the block (the resume checks compare bit for bit).
    An op without a deterministic implementation warns rather than raises (the comparison then
    shows whether it mattered). On CUDA, cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` set before its
    first use: gpu_check sets it at start."""
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    warn_before = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_before)
        torch.backends.cudnn.benchmark = benchmark
