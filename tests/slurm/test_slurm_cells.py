"""Grid cells of two ranks on a real (one-node) Slurm: `make test-slurm`, and `make test` on CI.

tests/slurm/up.sh starts the cluster (Debian's slurm-wlm 22.05, munge, select/cons_tres,
proctrack/linuxproc, task/none, no accounting); without it every test here is skipped with the
reason. Each cell is `ibridge train` on the smoke world with `trainer=ddp` over 2 Slurm tasks
(CPU, gloo), compared with the same run under torchrun: equal weights means the same ranks saw
the same batches and reduced the same gradients.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.slurm import cluster
from tests.torchrun import torchrun_command

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm"),
              pytest.mark.skipif(cluster.problem() is not None, reason=str(cluster.problem()))]

SHORT = ["sft.max_steps=6", "sft.log_every=2"]
LONG = ["sft.max_steps=200", "sft.log_every=10", "sft.save_every=50"]  # outlasts a requeue's signal


def torchrun_train(cwd: Path, cache: Path, *overrides: str) -> Path:
    """The uninterrupted reference: the same `train` under torchrun, 2 ranks; its SFT checkpoint."""
    env = {**os.environ, "IBRIDGE_CACHE": str(cache), "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    cmd = torchrun_command("-m", "ibridge", *cluster.TRAIN, "logger=none", *overrides, "hydra.run.dir=run")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return cwd / "run" / "sft" / "checkpoint"


def assert_same_weights(checkpoint: Path, reference: Path) -> None:
    ours, theirs = load_file(str(checkpoint / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    assert worst == 0.0, f"max |difference| {worst} from the uninterrupted torchrun run"


@pytest.fixture(scope="module")
def references(tmp_path_factory, model_cache) -> dict[str, Path]:
    """torchrun's SFT checkpoints: lr 1e-3 and 5e-4 for 6 steps, lr 1e-3 for 200."""
    out = {}
    for name, overrides in {"1e-3": ["lr=1e-3", *SHORT], "5e-4": ["lr=5e-4", *SHORT],
                            "long": ["lr=1e-3", *LONG]}.items():
        out[name] = torchrun_train(tmp_path_factory.mktemp(f"torchrun-{name}"), model_cache, *overrides)
    return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, model_cache) -> tuple[Path, str]:
    """Three 2-rank cells in one Slurm array: lr 1e-3 and 5e-4, and 2e-4 whose rank 1 fails in its
    third training forward (tests/slurm/faults.py). wandb offline. Returns the sweep folder and
    the sweep's terminal output."""
    cwd = tmp_path_factory.mktemp("slurm-sweep")
    started = time.monotonic()
    proc = cluster.sweep([*cluster.TRAIN, *SHORT, "lr=1e-3,5e-4,2e-4", *cluster.CELL_OF_TWO,
                          "+hydra.callbacks.fault._target_=tests.slurm.faults.Fault",
                          "+hydra.callbacks.fault.fail_rank=1", "+hydra.callbacks.fault.fail_cell=2",
                          "hydra.sweep.dir=sw"], cwd, model_cache)
    print(f"3-cell x 2-rank Slurm sweep: {time.monotonic() - started:.0f} s")
    return cwd / "sw", proc.stdout + proc.stderr


def test_two_rank_cells_end_with_the_weights_of_the_same_cells_under_torchrun(sweep, references):
    sweep_dir, _ = sweep
    cells = cluster.cell_folders(sweep_dir)
    for num, reference in ((0, references["1e-3"]), (1, references["5e-4"])):
        results = cluster.results(cells[num])
        assert results["status"] == "completed", results.get("error")
        sft = results["stages"]["sft"]
        assert sft["world_size"] == 2 and sft["distributed"] == "ddp" and sft["steps"] == 6
        assert sft["rank_checksums"][0] == sft["rank_checksums"][1]
        assert_same_weights(Path(sft["checkpoint"]), reference)
        # Written once, by rank 0: each logged step once (two single-process copies would log twice).
        steps = [json.loads(line)["step"] for line in (cells[num] / "metrics.jsonl").read_text().splitlines()
                 if "train/loss" in line]
        assert steps == [2, 4, 6]
        # Hydra's job log and .hydra/ too: rank 0's alone
        assert (cells[num] / "cli.log").read_text().count("ibridge][INFO] - job=train") == 1
        assert (cells[num] / ".hydra" / "overrides.yaml").is_file()


def test_a_cell_records_its_world_size_and_slurm_job_in_stage_json_and_wandb(sweep):
    from tests.wandb_offline import read_runs

    sweep_dir, _ = sweep
    cell = cluster.cell_folders(sweep_dir)[0]
    job_id = json.loads((cell / "results.json").read_text())["slurm_job_id"]
    assert job_id.split("_")[-1] == "0" and (sweep_dir / ".submitit" / job_id).is_dir()  # array element 0
    stage = json.loads((cell / "sft" / "stage.json").read_text())
    assert stage["world_size"] == 2 and stage["slurm_job_id"] == job_id and stage["requeues"] == 0
    runs = read_runs(cell)
    assert runs, "no wandb run in the cell"
    for run in runs:
        assert run.config["ibridge"]["world_size"] == 2 and run.config["ibridge"]["slurm_job_id"] == job_id


def _status_column(output: str) -> str:
    """The sweep table's status column, its wrapped lines joined: the text below the header
    "status", up to the first run of two spaces (the next column) on each line."""
    lines = output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("#") and " status " in line)
    start = lines[header].index(" status ") + 1
    cells = []
    for line in lines[header + 2:]:  # below the header's rule
        if not line.strip() or line.lstrip().startswith("next"):
            break
        cells.append(line[start:].split("  ")[0].strip())
    return " ".join(cell for cell in cells if cell)


def test_a_failing_rank_fails_its_cell_with_its_error_and_the_sweep_goes_on(sweep):
    sweep_dir, output = sweep
    cells = cluster.cell_folders(sweep_dir)
    failed = cluster.results(cells[2])
    assert failed["status"] == "failed"
    assert failed["error"].startswith("rank 1 of 2: RuntimeError: injected failure on rank 1"), failed["error"]
    assert [cluster.results(cells[n])["status"] for n in (0, 1)] == ["completed", "completed"]
    assert "failed: rank 1 of 2: RuntimeError: injected failure on rank 1" in _status_column(output), output[-3000:]
    assert output.count("ibridge: cell #") == 3  # a progress line per cell, from the submitting process


def test_sacct_is_not_called_so_no_repeated_warnings(sweep):
    _, output = sweep
    # The test cluster keeps no accounting: every sacct call would warn (submitit's watcher).
    assert "sacct" not in output


def test_a_cell_requeued_mid_sft_resumes_to_the_uninterrupted_weights(tmp_path, model_cache, references):
    proc = cluster.start_sweep([*cluster.TRAIN, "grid=none", "logger=none", "lr=1e-3", *LONG, *cluster.CELL_OF_TWO,
                                "hydra.sweep.dir=sw"], tmp_path, model_cache)
    try:
        cell = cluster.wait_until(lambda: next(iter(cluster.cell_folders(tmp_path / "sw").values()), None)
                                  if (tmp_path / "sw").is_dir() else None, 300, "the cell's folder", proc)
        cluster.wait_until(lambda: cluster.logged_steps(cell), 300, "a logged SFT step", proc)
        job = cluster.only_job(tmp_path / "sw")
        cluster.scontrol("requeue", job)  # as an administrator, or a node failure, would
        cluster.release_when_requeued(job)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            cluster.cancel_jobs(tmp_path / "sw")
    assert proc.returncode == 0, out[-4000:]
    results = cluster.results(cell)
    assert results["status"] == "completed" and results["requeues"] == 1, results.get("error")
    sft = results["stages"]["sft"]
    assert 0 < sft["resumed_from_step"] < 200, "the requeued cell did not resume from a saved state"
    assert_same_weights(Path(sft["checkpoint"]), references["long"])
    assert "completed (requeued 1x)" in out


def test_a_cell_at_its_time_limit_saves_is_requeued_and_resumes(tmp_path, model_cache, references):
    """Slurm's own time limit: the job's limit is cut to 1-2 minutes from now once SFT runs,
    so that Slurm sends submitit's USR2 (signal_delay_s=120 before the limit) within its
    30-s check; each training forward sleeps 0.3 s (tests/slurm/faults.py), so SFT is still
    running then. After the requeue the job gets its 10 minutes back."""
    proc = cluster.start_sweep([*cluster.TRAIN, "grid=none", "logger=none", "lr=1e-3", *LONG, *cluster.CELL_OF_TWO,
                                "+hydra.callbacks.fault._target_=tests.slurm.faults.Fault",
                                "+hydra.callbacks.fault.step_seconds=0.3", "hydra.sweep.dir=sw"], tmp_path, model_cache)
    try:
        cell = cluster.wait_until(lambda: next(iter(cluster.cell_folders(tmp_path / "sw").values()), None)
                                  if (tmp_path / "sw").is_dir() else None, 300, "the cell's folder", proc)
        cluster.wait_until(lambda: cluster.logged_steps(cell), 300, "a logged SFT step", proc)
        job = cluster.only_job(tmp_path / "sw")
        # A limit 60-120 s away: within signal_delay_s, so the signal comes at Slurm's next check.
        cluster.scontrol("update", f"JobId={job}", f"TimeLimit={cluster.elapsed_s(job) // 60 + 2}")
        cluster.release_when_requeued(job, time_limit_min=10)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            cluster.cancel_jobs(tmp_path / "sw")
    assert proc.returncode == 0, out[-4000:]
    results = cluster.results(cell)
    assert results["status"] == "completed" and results["requeues"] == 1, results.get("error")
    sft = results["stages"]["sft"]
    assert 0 < sft["resumed_from_step"] < 200, "no state saved at the signal"
    log = "".join(p.read_text() for p in (tmp_path / "sw" / ".submitit" / job).glob("*_0_log.*"))
    assert f"stopped by SIGUSR2 after step {sft['resumed_from_step']}" in log
    assert "Requeued job" in log  # submitit's requeue, from rank 0
    assert_same_weights(Path(sft["checkpoint"]), references["long"])


def test_one_task_per_node_starting_torchrun_trains_as_torchrun(tmp_path, model_cache, references):
    """hydra/launcher=slurm_torchrun: one Slurm task, which starts torchrun with 2 ranks."""
    cluster.sweep([*cluster.TRAIN, "grid=none", "logger=none", "lr=1e-3", *SHORT, "hydra/launcher=slurm_torchrun",
                   "hydra.launcher.nproc_per_node=2", "hydra.launcher.gpus_per_node=null",
                   "hydra.launcher.cpus_per_task=2", "hydra.launcher.mem_gb=null", "hydra.launcher.timeout_min=10",
                   "hydra.launcher.signal_delay_s=120", "hydra.sweep.dir=sw"], tmp_path, model_cache)
    results = cluster.results(next(iter(cluster.cell_folders(tmp_path / "sw").values())))
    assert results["status"] == "completed" and results["world_size"] == 2, results.get("error")
    assert_same_weights(Path(results["stages"]["sft"]["checkpoint"]), references["1e-3"])


def _queue() -> str:
    return subprocess.run(["squeue", "--noheader"], capture_output=True, text=True, timeout=30).stdout.strip()


@pytest.fixture(scope="module", autouse=True)
def no_job_left_in_the_queue():
    """After the module's last test (pytest-xdist may run them in another order than the file's,
    so this is a teardown, not a last test): every job the tests submitted has left the queue.
    A job whose results are in may still be ending for a few seconds (Slurm's epilogue, a rank
    exiting), so the queue gets a minute to drain; a job still there after that was left behind."""
    yield
    deadline = time.monotonic() + 60
    while (leftover := _queue()) and time.monotonic() < deadline:
        time.sleep(2)
    assert leftover == "", f"test jobs still in the queue:\n{leftover}"
