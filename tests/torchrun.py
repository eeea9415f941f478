"""Launching 2-process torchrun jobs on CPU (gloo) from tests, and the process group inside
those workers; not a test module."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def gloo_ddp_runtime() -> Iterator:
    """Inside a worker that torchrun started: a gloo process group and the fp32 CPU runtime in
    DDP mode. On a normal exit every rank waits at a barrier (so rank 0 has written its report
    before any rank leaves), then the group is torn down."""
    import torch
    import torch.distributed as dist

    from ibridge.distributed import DistInfo
    from ibridge.runtime import Runtime

    dist.init_process_group("gloo")
    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), mode="ddp")
    yield Runtime(device=torch.device("cpu"), precision="fp32", dist=info)
    dist.barrier()
    dist.destroy_process_group()
