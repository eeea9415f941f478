"""Shared fixtures: config composition and an isolated model cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ibridge.cli import CONF_DIR

REPO = Path(__file__).resolve().parent.parent

# Tests never talk to wandb's server.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def compose_config(overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """One cache for the whole session, so the smoke base model is built once.

    IBRIDGE_CACHE (CI sets it) keeps it across runs; otherwise a folder in the repo.
    """
    path = Path(os.environ.get("IBRIDGE_CACHE", REPO / ".cache" / "ibridge"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def ibridge(args: list[str], cwd: Path, cache: Path, check: bool = True, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """`python -m ibridge ARGS` in `cwd`, offline, with this checkout first on the path."""
    env = {**os.environ, "IBRIDGE_CACHE": str(cache), "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "ibridge", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ibridge {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, model_cache) -> Path:
    """One `ibridge debug=smoke` pipeline (wandb offline) for every test that reads one;
    its terminal output is kept in ``stdout.txt`` beside the run folder."""
    cwd = tmp_path_factory.mktemp("smoke")
    proc = ibridge(["debug=smoke", "trainer.num_threads=1", "hydra.run.dir=run"], cwd, model_cache)
    (cwd / "stdout.txt").write_text(proc.stdout)
    return cwd / "run"


@pytest.fixture(scope="session")
def two_cell_sweep(tmp_path_factory, model_cache) -> Path:
    """A 2-cell pipeline sweep (objective=sft,jsd), wandb offline; output in ``stdout.txt``."""
    cwd = tmp_path_factory.mktemp("sweep")
    proc = ibridge(["-m", "debug=smoke", "trainer.num_threads=1", "dpo.max_steps=4", "objective=sft,jsd", "lr=1e-3",
                    "seed=0", "hydra.sweep.dir=sw"], cwd, model_cache)
    (cwd / "stdout.txt").write_text(proc.stdout)
    return cwd / "sw"
