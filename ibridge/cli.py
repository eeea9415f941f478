"""`ibridge [JOB] [hydra overrides]` — job dispatch and the Hydra entry point.

JOB is one of pipeline (default), train, eval, qlogit, report, dashboard; everything after it is Hydra's
(`key=value`, `group=option`, `-m`, `--cfg job`, `--help`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ibridge.config import JOBS, ConfigError, validate
from ibridge.folders import discard_unused_run_dir, holds_a_run
from ibridge.paths import config_dir
from ibridge.run_folders import folder_name, resolve_checkpoints, run_folder
from ibridge.stage_inputs import StaleRunError
from ibridge.sweeps import completed_earlier

CONF_DIR = config_dir()  # conf/ of a checkout, or ibridge/conf of an installed wheel
log = logging.getLogger("ibridge")


# A run folder's name from Hydra's override_dirname, in characters that paste back into an override.
OmegaConf.register_new_resolver("ibridge.dirname", folder_name, replace=True)
# hydra.run.dir: outputs/<job>/<name>, or for `report` the reported sweep's report/<name>.
OmegaConf.register_new_resolver("ibridge.run_folder", run_folder, replace=True)


# Hydra flags that take a value: the word after them is not a JOB (`--cfg job`).
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                    "--config-dir", "-cd", "--experimental-rerun", "--info", "-i"}


def _split_job(args: list[str]) -> list[str]:
    """Turn the first positional word (JOB) into the override ``job=JOB``.

    JOB may come after Hydra's flags (`ibridge -m train lr=...`) as well as before.
    """
    skip_next = False
    for index, arg in enumerate(args):
        if skip_next:
            skip_next = False
            continue
        if arg in FLAGS_WITH_VALUE:
            skip_next = True
            continue
        if arg.startswith("-") or "=" in arg:
            continue
        if arg not in JOBS:
            print(f"ibridge: unknown job {arg!r}; valid jobs: {', '.join(JOBS)}", file=sys.stderr)
            raise SystemExit(2)
        return [*args[:index], f"job={arg}", *args[index + 1 :]]
    return args


def _is_sweep_axis(arg: str) -> bool:
    """`key=a,b` or `key=range(...)`/`choice(...)`/`glob(...)`: an axis Hydra sweeps."""
    if "=" not in arg or arg.startswith("-"):
        return False
    value = re.sub(r"\[[^\]]*\]|\{[^}]*\}|'[^']*'|\"[^\"]*\"", "", arg.split("=", 1)[1])
    return "," in value or re.match(r"\s*(range|choice|glob|interval)\(", value) is not None


def _default_grid(args: list[str]) -> list[str]:
    """`ibridge -m` with no sweep axis runs the learning-rate grid (conf/grid/lr.yaml).

    With axes on the command line, only those are swept, unless a `grid=` is given too.
    """
    multirun = any(arg in ("-m", "--multirun") for arg in args)
    chosen = any(arg.startswith(("grid=", "+grid=")) for arg in args)
    if multirun and not chosen and not any(_is_sweep_axis(arg) for arg in args):
        return [*args, "grid=lr"]
    return args


def _check_overrides(args: list[str]) -> None:
    """Compose a single run's overrides first, so that an unknown key or option is a
    one-line error naming it (Hydra's own message spans several lines)."""
    from ibridge.composing import compose, composition_errors, composition_message, task_overrides

    if any(arg.startswith("-") for arg in args) or any(_is_sweep_axis(arg) for arg in args):
        return  # flags (--help, -m, --cfg) are Hydra's to handle; sweeps are checked per cell (ibridge.sweeps)
    try:
        compose(CONF_DIR, task_overrides(args))
    except composition_errors() as err:
        print(f"ibridge: config error: {composition_message(err)}", file=sys.stderr)
        raise SystemExit(2) from None


def register_launchers() -> None:
    """Register hydra/launcher/ibridge_slurm (the schema of hydra/launcher=slurm|slurm_torchrun).

    Hydra finds plugins by listing the ``hydra_plugins`` namespace's folders, and under an
    editable install (``pip install -e .``, what ``make setup`` does) that namespace's entry for
    this checkout is an import hook, which the listing skips: outside the checkout, Hydra then
    reports "Could not load 'hydra/launcher/ibridge_slurm'" and, once the config is found,
    "Unknown plugin class". Importing the config stores the node, and Hydra's own
    ``Plugins.register`` adds the launcher class, whatever the install (under a wheel, where the
    scan finds both, this stores the same node and class again).
    """
    from hydra.core.plugins import Plugins

    import hydra_plugins.ibridge_slurm_launcher.config  # noqa: F401 - stores the config node on import
    from hydra_plugins.ibridge_slurm_launcher.ibridge_slurm_launcher import SlurmCellLauncher

    Plugins.instance().register(SlurmCellLauncher)


def main(argv: list[str] | None = None) -> None:
    if "--version" in (sys.argv[1:] if argv is None else argv):  # ibridge's and its libraries', not Hydra's
        from ibridge.versions import version_text

        print(version_text())
        return
    from ibridge.commandline import before_hydra, resume_first

    register_launchers()

    try:
        args = _default_grid(resume_first(_split_job(sys.argv[1:] if argv is None else list(argv))))
        args = before_hydra(args, CONF_DIR)  # --help, completion, a sweep's checks and preview (may exit)
        _check_overrides(args)
        sys.argv = [sys.argv[0] if sys.argv else "ibridge", *args]
        _hydra_entry()
    except KeyboardInterrupt:  # outside a run (a run prints its own line): no traceback either
        from ibridge.interrupts import EXIT_CTRL_C

        print("ibridge: interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(EXIT_CTRL_C) from None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_entry(cfg: DictConfig) -> dict:
    return run(cfg)  # a sweep's callback reads it (a skipped cell: ibridge.summary.progress_line; a Slurm cell's ranks: ibridge/slurm/cell.py)


def _group_name(hydra_cfg, run_dir: Path) -> str:
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep = Path(hydra_cfg.sweep.dir).resolve()  # `hydra.sweep.dir=sw` still names its parent
        return f"sweep-{sweep.parent.name}-{sweep.name}"
    return f"run-{run_dir.parent.name}-{run_dir.name}"


def _refused(err: ConfigError, run_dir: Path, results: dict, write_results, multirun: bool) -> dict:
    """A config error: a sweep's cell is recorded as failed and the sweep goes on; a single run
    says it in one line and exits 2. Neither leaves a folder behind nor writes over the
    results of a run the folder already holds."""
    results.update(status="failed", error=f"config error: {err}")
    if multirun:
        if not holds_a_run(run_dir):
            write_results(results)
        log.error("config error: %s", err)
        return results
    discard_unused_run_dir(run_dir)
    print(f"ibridge: config error: {err}", file=sys.stderr)
    raise SystemExit(2) from None


def run(cfg: DictConfig) -> dict:
    """Validate, run the job, and write results.json last, atomically (rank 0 only under DDP)."""
    from ibridge import launch_env
    from ibridge.distributed import barrier, shutdown
    from ibridge.io import write_json_atomic
    from ibridge.runtime import resolve_runtime
    from ibridge.stage_settings import refuse_ignored

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(cfg.output_dir or hydra_cfg.runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"status": "running", "job": cfg.job, "run_dir": str(run_dir),
                     "overrides": list(hydra_cfg.overrides.task)}
    if hydra_cfg.runtime.choices.get("debug") not in (None, "none"):
        results["debug"] = hydra_cfg.runtime.choices["debug"]  # its numbers are labelled as a smoke test
    started = time.time()
    main_process = True
    runtime = None
    failed = True  # until the job returns: shutdown() must not wait for ranks after an error

    def write_results(payload: dict) -> None:
        if main_process:
            write_json_atomic(run_dir / "results.json", payload)

    try:
        resolve_checkpoints(cfg)  # checkpoint=<run folder>: the stage checkpoint in it (run_folders.py)
        validate(cfg)
        refuse_ignored(cfg, list(hydra_cfg.overrides.task))  # a key the job would not read (stage_settings.py)
        OmegaConf.resolve(cfg)
        runtime = resolve_runtime(cfg.trainer, cfg.model)
        main_process = runtime.dist.is_main
        if main_process:
            prepare_run_dir(run_dir, cfg)
        if multirun and (earlier := completed_earlier(run_dir)) is not None and \
                _still_current(cfg, run_dir, runtime):  # completed in an earlier attempt, from today's inputs
            failed = False
            return {**earlier, "skipped": True}
        barrier(runtime.dist)
        # How it was launched (world size; Slurm job id and requeues): results.json and wandb config.
        launched = launch_env.identity(runtime.dist.world_size)
        results.update(launched)
        identity = {"sweep": str(Path(hydra_cfg.sweep.dir).resolve()) if multirun else None, **launched}
        results.update(_run_job(cfg, run_dir, _group_name(hydra_cfg, run_dir), runtime, identity,
                                list(hydra_cfg.overrides.task)))
        results["status"] = "completed"
        failed = False
    except ConfigError as err:
        return _refused(err, run_dir, results, write_results, multirun)
    except StaleRunError as err:  # nothing ran
        return _stale(err, results, write_results, multirun)
    except KeyboardInterrupt:
        from ibridge.interrupts import EXIT_CTRL_C, stop_run

        results.update(status="failed", error="interrupted (Ctrl-C)", runtime_s=round(time.time() - started, 2))
        stop_run(run_dir, results, write_results, main_process, "interrupted (Ctrl-C)", EXIT_CTRL_C)
    except Exception as err:  # the run is marked failed; a sweep's other cells go on
        recorded = _failed(err, run_dir, results, write_results, main_process, multirun, started)
        if recorded is None:
            raise
        return recorded
    finally:
        if runtime is not None:
            shutdown(runtime.dist, failed=failed)
    return _finished(results, run_dir, write_results, main_process, multirun, started)


def _stale(err: StaleRunError, results: dict, write_results, multirun: bool) -> dict:
    """A finished unit's inputs changed (ibridge/stage_inputs.py): nothing ran."""
    if multirun:  # the cell is recorded failed, as the sweep's summary and report read it
        results.update(status="failed", error=f"stale run: {err}")
        write_results(results)
        log.error("stale run: %s", err)
        return results
    # a single run's results.json keeps what the earlier run wrote; the message is on the terminal
    print(f"ibridge: stale run: {err}", file=sys.stderr)
    raise SystemExit(2) from None


def _failed(err: Exception, run_dir: Path, results: dict, write_results, main_process: bool, multirun: bool,
            started: float) -> dict | None:
    """Record a failed run (results.json, error.log). A sweep cell returns its results and the sweep
    goes on; a stop request or a data error ends in one line; otherwise None: the caller re-raises."""
    from ibridge.data import DataError
    from ibridge.data.formatting import TemplateError
    from ibridge.training import StopRequested

    # A malformed row or a missing field: the message names file, line and field already.
    data_error = isinstance(err, (DataError, TemplateError))
    results.update(status="failed", error=f"data error: {err}" if data_error else f"{type(err).__name__}: {err}")
    if main_process:
        (run_dir / "error.log").write_text(traceback.format_exc())
    write_results({**results, "runtime_s": round(time.time() - started, 2)})
    if isinstance(err, StopRequested):
        # SIGTERM stops the whole sweep. Hydra's launchers record an Exception as a
        # failed cell and start the next one; SystemExit is not an Exception. A Slurm
        # cell's preemption signal ends its job, which the launcher requeues (ibridge/slurm/).
        from ibridge.interrupts import EXIT_SIGTERM, stop_run
        from ibridge.preemption import preempted

        if preempted():
            log.error("%s", err)
            raise SystemExit(EXIT_SIGTERM) from None
        stop_run(run_dir, None, write_results, main_process, str(err).split("; ")[0], EXIT_SIGTERM)
    if multirun:
        log.error("run failed: %s (traceback in %s)", err, run_dir / "error.log")
        return results
    if data_error and os.environ.get("HYDRA_FULL_ERROR") != "1":
        print(f"ibridge: data error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    return None


def _finished(results: dict, run_dir: Path, write_results, main_process: bool, multirun: bool,
              started: float) -> dict:
    """Write a completed run's results.json last, and say what it produced."""
    results["runtime_s"] = round(time.time() - started, 2)
    write_results(results)
    if main_process:
        (run_dir / "error.log").unlink(missing_ok=True)  # an earlier attempt's error no longer applies
        log.info("results: %s", run_dir / "results.json")
        if not multirun:  # a sweep prints one line per cell at its end (ibridge.summary.SweepSummary)
            from ibridge.summary import print_run

            print_run(results)
    return results


def config_fingerprint(cfg: DictConfig) -> str:
    """Hash of the resolved config, minus keys that do not change what a run computes."""
    import hashlib

    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in ("output_dir", "resume"):
        plain.pop(key, None)
    (plain.get("report") or {}).pop("path", None)  # a report's folder is inside the sweep it names
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """Resume a run folder holding the same config, or set an older run aside.

    A folder is named by the command's overrides, so running a command again finds
    its earlier run. With the same config it resumes; with a different one (a
    changed default, say) it stops with an error rather than mix two runs, unless
    ``resume=false``, which moves the earlier run's files to ``<folder>.bak-<time>``.
    """
    import shutil

    marker = run_dir / "run.json"
    fingerprint = config_fingerprint(cfg)
    if marker.is_file():
        previous = json.loads(marker.read_text()).get("config_fingerprint")
        if cfg.resume and previous != fingerprint:
            raise ConfigError(
                f"run folder {run_dir} holds a run with a different config; pass resume=false to start "
                f"over (the earlier run is kept as {run_dir.name}.bak-<time>) or choose hydra.run.dir"
            )
        if not cfg.resume:
            backup = run_dir.with_name(f"{run_dir.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
            backup.mkdir()
            for entry in run_dir.iterdir():
                if entry.name != ".hydra" and not entry.name.endswith(".log"):
                    shutil.move(str(entry), backup / entry.name)
            log.info("resume=false: moved the earlier run to %s", backup)
        else:
            log.info("resuming the run in %s", run_dir)
    from ibridge.io import write_json_atomic

    write_json_atomic(marker, {"config_fingerprint": fingerprint})
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))


# Jobs whose stages and evaluations record their inputs (ibridge/stage_inputs.py): a sweep
# skips such a cell that completed earlier only once each of them has compared its inputs.
CHECKED_JOBS = ("pipeline", "train", "eval")


def _still_current(cfg: DictConfig, run_dir: Path, runtime) -> bool:
    """Whether a cell that completed earlier may be skipped: each of its stages and evaluations
    compares its recorded inputs with today's (StaleRunError names what changed), computing
    nothing. False when one of them has no finished result after all: the cell runs."""
    from ibridge.stage_inputs import UnfinishedUnit

    if cfg.job not in CHECKED_JOBS:
        return True
    try:
        _run_job(cfg, run_dir, "", runtime, check_only=True)
    except UnfinishedUnit as unit:
        log.info("%s has no finished result in %s: the cell runs", unit, run_dir)
        return False
    return True


def _run_job(cfg: DictConfig, run_dir: Path, group: str, runtime, identity: dict | None = None,
             overrides: list[str] | None = None, check_only: bool = False) -> dict:
    from tqdm.contrib.logging import logging_redirect_tqdm
    from transformers.utils import logging as hf_logging

    from ibridge.data import source_for
    from ibridge.jobs import JOBS as JOB_FUNCTIONS
    from ibridge.jobs.context import RunContext
    from ibridge.judging.alpaca_data import with_eval_set
    from ibridge.judging.stage import check_judge
    from ibridge.naming import cell_tag
    from ibridge.runtime import seed_everything
    from ibridge.tracking import RunLogger

    hf_logging.disable_progress_bar()  # weight-loading bars would bury the stage bars
    seed_everything(int(cfg.seed))
    config = OmegaConf.to_container(cfg, resolve=True)
    tag = cell_tag(cfg, overrides or [])
    logger = RunLogger(run_dir, cfg.logger, config, group, enabled=runtime.dist.is_main and not check_only,
                       identity={"cell": tag, **(identity or {})})
    source = with_eval_set(source_for(cfg.data), cfg.get("eval_set"))  # eval_set=alpaca_eval: its prompts
    ctx = RunContext(cfg=cfg, run_dir=run_dir, runtime=runtime, logger=logger, source=source, tag=tag,
                     check_only=check_only)
    log.info("job=%s run_dir=%s device=%s precision=%s%s", cfg.job, run_dir, runtime.device, runtime.precision,
             " (checking the inputs of a run that completed earlier)" if check_only else "")
    if cfg.job in ("pipeline", "eval") and not check_only:
        check_judge(cfg, runtime.dist)  # judge=alpaca_eval: key and endpoint, before anything is generated
    try:
        with logging_redirect_tqdm():  # a log line clears the progress bar first, instead of breaking it
            JOB_FUNCTIONS[cfg.job](ctx)
    except BaseException as err:
        try:
            logger.fail(err)  # the open wandb run ends with a non-zero exit code and the error
        except Exception as log_err:  # the job's error is the one to report
            log.warning("could not mark the wandb run failed: %s", log_err)
        raise
    finally:
        logger.finish()
    ctx.results["wandb_group"] = logger.group if logger.backend == "wandb" else None
    ctx.results["cell"] = tag
    ctx.results["seed"] = int(cfg.seed)
    ctx.results["device"] = str(runtime.device)
    ctx.results["precision"] = runtime.precision
    return ctx.results
