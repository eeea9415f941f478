"""The toy base model built by a job of several ranks: rank 0 builds it, whoever comes first.

transformers' save_pretrained writes weights on rank 0 of a process group only; a base built
by another rank (the first to take the lock, as in a Slurm cell whose tasks start unevenly)
was published without weights, and every later run in that cache failed to load it.
"""

from __future__ import annotations

import pytest

from tests.torchrun import run_worker

pytestmark = pytest.mark.slow  # a 2-process torchrun and a base build


def test_two_ranks_in_an_empty_cache_get_a_base_with_weights(tmp_path):
    run_worker("base_build_worker.py", str(tmp_path / "cache"))
    (base,) = [p for p in (tmp_path / "cache" / "base").iterdir() if p.is_dir()]
    assert (base / "model.safetensors").is_file()
