"""A plain (non-editable) install runs: the wheel carries the configs, and `ibridge --version`.

The wheel is built from a copy of the checkout with this venv's setuptools (no download) and
installed with `pip install --target` (no dependencies: they are this venv's), then run from a
folder with no conf/ in sight, so that only the installed package can supply the configs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

SOURCES = ("ibridge", "conf", "pyproject.toml", "setup.py", "README.md")


def _pip(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # built without isolation (no download): with this venv's setuptools, which `make setup-deepspeed` installs
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools in this venv")
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, source / name)
    _pip("wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"))
    (built,) = (root / "dist").glob("ibridge-*.whl")
    return built


@pytest.mark.slow  # the wheel build: ~15 s
def test_the_wheel_carries_every_module_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"ibridge/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*")
               if p.is_file()}
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "ibridge").rglob("*.py")}
    assert configs and configs <= names, sorted(configs - names)
    assert modules <= names, sorted(modules - names)
    assert not any(name.startswith(("conf/", "tests/")) for name in names)  # only inside the package


@pytest.mark.slow
def test_an_installed_wheel_runs_a_stage_and_prints_its_versions(wheel, tmp_path, model_cache):
    site = tmp_path / "site"
    _pip("install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel))
    work = tmp_path / "work"  # no conf/ here, and the checkout is not on the path
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "IBRIDGE_CACHE": str(model_cache), "WANDB_MODE": "offline"}

    def run(*args: str) -> subprocess.CompletedProcess:
        # the console script pip wrote, run by this interpreter (its shebang may be too long for the kernel)
        proc = subprocess.run([sys.executable, str(site / "bin" / "ibridge"), *args], cwd=work, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return proc

    where = subprocess.run([sys.executable, "-c", "import ibridge.cli as c; print(c.__file__); print(c.CONF_DIR)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert [Path(p).is_relative_to(site) for p in where] == [True, True], where

    lines = run("--version").stdout.splitlines()
    assert [line.split(" ", 1)[0] for line in lines][:4] == ["ibridge", "torch", "transformers", "trl"]
    import torch
    import transformers

    from ibridge import __version__
    assert lines[0] == f"ibridge {__version__}" and lines[1] == f"torch {torch.__version__}"
    assert lines[2] == f"transformers {transformers.__version__}"
    assert lines[3].startswith("trl ") and "Hydra" not in "\n".join(lines)

    run("train", "debug=smoke", "trainer.num_threads=1", "logger=none", "sft.max_steps=2", "hydra.run.dir=run")
    results = json.loads((work / "run" / "results.json").read_text())
    assert results["status"] == "completed" and results["stages"]["sft"]["steps"] == 2


def test_version_names_a_missing_library(monkeypatch, capsys):
    from importlib import metadata

    from ibridge import cli

    real = metadata.version

    def version(name):
        if name == "trl":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    cli.main(["--version"])
    out = capsys.readouterr().out.splitlines()
    assert "trl not installed" in out and out[0].startswith("ibridge ")
