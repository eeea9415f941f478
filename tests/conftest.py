"""Shared fixtures: config composition and an isolated model cache."""

from __future__ import annotations

import os
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
