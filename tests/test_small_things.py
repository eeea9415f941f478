"""Small things a user trips over: a fractional seed, folders left by config errors, AlpacaEval's
generator name, the base-model lock. (A stale error.log: tests/test_interrupts.py; the cell
line's time: tests/test_terminal.py; a refused rerun keeps the earlier results: tests/test_resume.py.)"""

from __future__ import annotations

import json
import threading

import pytest
from filelock import FileLock, Timeout

from ibridge.folders import discard_unused_run_dir
from ibridge.models import _file_lock
from tests.test_cli_smoke import ibridge


def test_a_fractional_seed_is_refused_and_leaves_no_folder(tmp_path, model_cache):
    proc = ibridge(["train", "debug=smoke", "logger=none", "seed=1.5", "hydra.run.dir=out/run"], tmp_path, model_cache,
                   check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "ibridge: config error: seed=1.5: expected an integer >= 0"
    assert not (tmp_path / "out").exists(), list(tmp_path.rglob("*"))


def test_a_config_error_keeps_an_earlier_run_and_other_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    earlier = tmp_path / "outputs" / "train" / "earlier"
    (earlier / ".hydra").mkdir(parents=True)
    (earlier / "run.json").write_text("{}")  # a run started here once: kept
    assert not discard_unused_run_dir(earlier) and earlier.is_dir()
    mine = tmp_path / "outputs" / "train" / "mine"
    (mine / ".hydra").mkdir(parents=True)
    (mine / "notes.txt").write_text("the user's")  # not what Hydra or a refused start writes: kept
    assert not discard_unused_run_dir(mine) and (mine / "notes.txt").is_file()
    (mine / "notes.txt").unlink()
    (mine / "train.log").write_text("")
    assert discard_unused_run_dir(mine) and not mine.exists()
    assert (tmp_path / "outputs" / "train").is_dir()  # still holds `earlier`
    (tmp_path / ".hydra").mkdir()
    assert not discard_unused_run_dir(tmp_path)  # hydra.run.dir=. : the working folder is never removed


def test_alpaca_eval_outputs_name_the_run(smoke_run):
    results = json.loads((smoke_run / "results.json").read_text())
    generators = {}
    for stage in ("base", "sft", "dpo"):
        rows = json.loads((smoke_run / "eval" / stage / "alpaca_eval.json").read_text())
        generators[stage] = {row["generator"] for row in rows}
    assert generators == {stage: {f"{stage}-{results['cell']}"} for stage in ("base", "sft", "dpo")}
    assert results["cell"] == "sft-lr1e-3-s0"


def test_the_base_model_lock_excludes_another_holder(tmp_path):
    path = tmp_path / "base.lock"
    lock = _file_lock(path)
    assert isinstance(lock, FileLock)
    held = threading.Event()
    release = threading.Event()

    def hold():
        with FileLock(str(path)):  # another holder (another process's lock on the same file)
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(30)
    with pytest.raises(Timeout):
        lock.acquire(timeout=0.2)
    release.set()
    holder.join(30)
    with lock:  # free again once the other holder let go
        assert lock.is_locked
