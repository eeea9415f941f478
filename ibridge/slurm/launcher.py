"""`hydra/launcher=slurm`: each grid cell one Slurm job of one or many ranks.

``SlurmCellLauncher`` (hydra_plugins/ibridge_slurm_launcher/: Hydra takes launchers from its
plugin package only) is Hydra's submitit Slurm launcher with this mixin's three changes:

* in the job, each task runs one rank of the cell (ibridge/slurm/cell.py), or, with
  ``nproc_per_node``, each node's task starts torchrun (ibridge/slurm/torchrun_cell.py);
* before submitting, a cell whose number of ranks does not fit its trainer (several ranks and
  ``trainer=cpu``, one rank and ``trainer=ddp``) or its GPUs is a one-line config error;
* waiting: each cell's tasks are read as they end (ibridge/slurm/queue.py, no ``sacct``), a
  progress line printed, and a cell with a failed or missing task recorded as failed with the
  first failing rank's error (ibridge/slurm/outcome.py); the other cells go on.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf, open_dict

from ibridge.config import ConfigError
from ibridge.launch_env import DATA_PARALLEL_MODES
from ibridge.slurm.outcome import cell_failure, read_task, record_failure
from ibridge.slurm.queue import GONE, ended, wait_for_jobs

log = logging.getLogger(__name__)

# Launcher keys of ibridge's own (hydra_plugins/ibridge_slurm_launcher/config.py), not submitit's.
OWN_KEYS = ("nproc_per_node",)


def ranks_per_node(params: dict) -> int:
    return int(params.get("nproc_per_node") or params.get("tasks_per_node") or 1)


def check_shape(params: dict) -> None:
    """Tasks, ranks and GPUs per node that fit together (one line each)."""
    tasks = int(params.get("tasks_per_node") or 1)
    nproc = params.get("nproc_per_node")
    gpus = params.get("gpus_per_node")
    if nproc is not None and (int(nproc) < 1 or tasks != 1):
        raise ConfigError(f"hydra.launcher.nproc_per_node={nproc} starts torchrun in one task per node: it needs "
                          f"tasks_per_node=1 (got {tasks}) and nproc_per_node >= 1")
    timeout_s, delay = 60 * float(params.get("timeout_min") or 0), params.get("signal_delay_s")
    if timeout_s and delay is not None and float(delay) > timeout_s / 2:
        # Earlier, a cell would be signalled (and requeued) before it did much work, again and again.
        raise ConfigError(f"hydra.launcher.signal_delay_s={delay} is more than half the time limit "
                          f"(timeout_min={params.get('timeout_min')}): raise timeout_min or lower signal_delay_s")
    ranks = ranks_per_node(params)
    if gpus and int(gpus) != ranks:
        raise ConfigError(
            f"hydra.launcher.gpus_per_node={gpus} but {ranks} rank(s) per node: give each rank one GPU "
            f"(tasks_per_node={gpus} with hydra/launcher=slurm, or nproc_per_node={gpus} with "
            "hydra/launcher=slurm_torchrun)")


def check_cell(cfg, num: int, ranks: int) -> None:
    """A cell of several ranks needs a data-parallel trainer, and such a trainer several ranks."""
    mode = OmegaConf.select(cfg, "trainer.distributed", default="none")
    if ranks > 1 and mode not in DATA_PARALLEL_MODES:
        raise ConfigError(f"cell #{num}: {ranks} ranks per cell (hydra.launcher) but trainer.distributed={mode}: "
                          "each rank would run the whole job alone into the cell's folder; use trainer=ddp, "
                          "trainer=fsdp or trainer=deepspeed, or tasks_per_node=1")
    if ranks == 1 and mode in DATA_PARALLEL_MODES:
        raise ConfigError(f"cell #{num}: trainer.distributed={mode} but one rank per cell: set "
                          "hydra.launcher.tasks_per_node (or nproc_per_node with slurm_torchrun) to the GPUs per node")


class CellLauncherMixin:
    """Mixed into Hydra's ``SlurmLauncher`` (``self.params``, ``self.config``, ``self.hydra_context``)."""

    def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state):
        """In the Slurm job: one task of the cell (see the module's docstring)."""
        args = (sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
        if self.params.get("nproc_per_node"):
            from ibridge.slurm.torchrun_cell import run_node

            return run_node(self, args)
        from ibridge.slurm.cell import run_task

        return run_task(self, args)

    def _executor(self):
        """submitit's executor, set up as Hydra's launcher does, without ibridge's own keys."""
        import submitit

        params = {k: v for k, v in self.params.items() if k not in OWN_KEYS}
        init = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init["slurm_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster="slurm", **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
        return executor

    def _cells(self, job_overrides: Sequence[Sequence[str]], first: int) -> list[tuple[int, list[str], Path]]:
        """(number, overrides, folder) of each cell, its shape checked before anything is submitted."""
        cells = []
        for offset, overrides in enumerate(job_overrides):
            num = first + offset
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg.hydra.job):
                cfg.hydra.job.num = num
            check_cell(cfg, num, int(self.params.get("nodes") or 1) * ranks_per_node(self.params))
            cells.append((num, list(overrides), Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)))
        return cells

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        try:
            check_shape(self.params)
            cells = self._cells(job_overrides, initial_job_idx)
        except ConfigError as err:
            print(f"ibridge: config error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("Slurm sweep output dir: %s", sweep_dir)
        for num, overrides, _ in cells:
            log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
        from hydra.core.singleton import Singleton

        job_args = [(overrides, "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state())
                    for num, overrides, _ in cells]
        jobs = self._executor().map_array(self, *zip(*job_args, strict=True))
        tasks = int(self.params.get("nodes") or 1) * (1 if self.params.get("nproc_per_node")
                                                        else int(self.params.get("tasks_per_node") or 1))
        returns: list[JobReturn | None] = [None] * len(cells)
        started = time.perf_counter()

        def result_files(job) -> list[Path]:
            return [job.task(t).paths.result_pickle for t in range(tasks)]

        def done(index: int, state: str | None) -> None:
            returns[index] = self._cell_return(cells[index], jobs[index], tasks, state)
            from ibridge.summary import progress_line

            print(progress_line(None, returns[index], None, started), flush=True)

        wait_for_jobs(jobs, result_files, done)
        return returns

    def _cell_return(self, cell, job, tasks: int, state: str | None) -> JobReturn:
        """Rank 0's JobReturn, or, for a cell with a failed or missing task, one whose results say
        failed (a completed JobReturn holding them: a failed cell must not stop Hydra's sweep)."""
        num, overrides, cell_dir = cell
        results = [read_task(t, job.task(t).paths.result_pickle) for t in range(tasks)]
        final_state = state if ended(state) and state != GONE else None  # not "RUNNING" while it ends
        error = cell_failure(results, job.job_id, final_state, job.task(0).paths.stderr)
        rank0 = results[0].outcome.job_return if results[0].outcome is not None else None
        if error is None and rank0 is not None:
            return rank0
        if error is None:
            error = f"rank 0 returned nothing (Slurm job {job.job_id})"
        record = record_failure(cell_dir, error, {"slurm_job_id": job.job_id, "overrides": overrides})
        ret = JobReturn(overrides=overrides, working_dir=str(cell_dir), task_name="ibridge", status=JobStatus.COMPLETED,
                        _return_value=record)
        ret.hydra_cfg = OmegaConf.create({"hydra": {"job": {"num": num}, "runtime": {"output_dir": str(cell_dir)}}})
        ret.cfg = getattr(rank0, "cfg", None)
        return ret
