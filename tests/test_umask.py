"""Outputs honour the umask (ibridge/io.py): mkstemp/mkdtemp made every result 0600 and every
checkpoint folder 0700, so that on a shared cluster a colleague could read none of them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_files_and_published_folders_get_the_umask_mode(mask, tmp_path):
    from ibridge import refcache
    from ibridge.io import publish_dir, staging_dir, write_json_atomic

    previous = os.umask(mask)
    try:
        write_json_atomic(tmp_path / "run" / "results.json", {"status": "completed"})
        folder = staging_dir(tmp_path / "run" / "checkpoint")
        save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))  # safetensors writes 0600
        (folder / "config.json").write_text("{}")
        publish_dir(folder, tmp_path / "run" / "checkpoint")
        refcache._write(tmp_path / "cache" / "key.safetensors", [torch.zeros(3), torch.ones(2)])
    finally:
        os.umask(previous)
    assert mode(tmp_path / "run" / "results.json") == 0o666 & ~mask
    assert mode(tmp_path / "run" / "checkpoint") == 0o777 & ~mask
    assert mode(tmp_path / "run" / "checkpoint" / "model.safetensors") == 0o666 & ~mask
    assert mode(tmp_path / "run" / "checkpoint" / "config.json") == 0o666 & ~mask
    assert mode(tmp_path / "cache" / "key.safetensors") == 0o666 & ~mask


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_the_umask_is_read_without_being_changed(mask):
    from ibridge.io import current_umask

    previous = os.umask(mask)
    try:
        assert current_umask() == mask and current_umask() == mask
    finally:
        assert os.umask(previous) == mask


def test_a_pipeline_run_folder_is_as_readable_as_the_umask_allows(smoke_run):
    """The session's smoke pipeline ran with this process's umask (a child inherits it)."""
    mask = os.umask(0)
    os.umask(mask)
    files = [smoke_run / "results.json", smoke_run / "sft" / "stage.json", smoke_run / "eval" / "dpo" / "eval.json",
             smoke_run / "dpo" / "checkpoint" / "config.json", smoke_run / "dpo" / "checkpoint" / "model.safetensors"]
    folders = [smoke_run / "sft" / "checkpoint", smoke_run / "dpo" / "checkpoint"]
    assert {str(p): mode(p) for p in files} == {str(p): 0o666 & ~mask for p in files}
    assert {str(p): mode(p) for p in folders} == {str(p): 0o777 & ~mask for p in folders}
