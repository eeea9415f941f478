"""Launching 2-process torchrun jobs on CPU (gloo) from tests; not a test module."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port no one listens on now: xdist workers run torchruns side by side."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun_command(*args: str) -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node 2 --master_port <free> *args``."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            *args]


def run_worker(worker: str, *args: str, env: dict | None = None, timeout: float = 300,
               tail: int = 4000) -> subprocess.CompletedProcess:
    """Run ``tests/<worker>`` on 2 ranks with this checkout first on the path; fails the test
    with the end of its stderr unless it exits 0."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(torchrun_command(str(REPO / "tests" / worker), *args), env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-tail:]
    return proc
