"""Metrics to metrics.jsonl and to wandb, organised for dashboards (docs/design.md §3).

One wandb project; a pipeline's stages share a `group` (a sweep's cells share
the sweep's group); `job_type` is the stage; the run name says the overrides;
the resolved config is the run's config, plus `ibridge.{cell,sweep,group}` and
`run_dir`, so a run leads back to its folder. wandb is offline unless the user asks.

A run that fails finishes with a non-zero exit code and ``status``/``error`` in its
summary. A stage that starts again in the same folder (a resume) keeps its wandb run
id, kept in ``<stage folder>/run_log.json``. Offline runs cannot be resumed by
wandb itself, so the new offline folder of that id gets the stage's history again,
replayed from metrics.jsonl up to the resume point, and the earlier, partial offline
folder moves to ``wandb/superseded/``: syncing ``wandb/offline-run-*`` uploads each
run once, whole. Online, wandb resumes the run server-side (``resume="allow"``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Environment variables that must never reach a config, a log or wandb's config.
SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
# Kept in a stage's folder: its wandb run id and where its metrics start in metrics.jsonl.
RUN_LOG = "run_log.json"
SUPERSEDED = "superseded"


def scrub(config: dict) -> dict:
    """Drop any value that looks like a secret from a config before it is logged."""
    clean = {}
    for key, value in config.items():
        if isinstance(value, dict):
            clean[key] = scrub(value)
        elif any(marker in str(key).upper() for marker in SECRET_MARKERS):
            clean[key] = "<redacted>"
        else:
            clean[key] = value
    return clean


class RunLogger:
    """Writes every metric to `<run_dir>/metrics.jsonl` and, when enabled, to wandb.

    `identity` (``cell``, ``sweep``, ``group``) goes into every wandb run's config under
    ``ibridge``, with ``run_dir``.
    """

    def __init__(self, run_dir: Path, logger_cfg, config: dict, group: str, enabled: bool = True,
                 identity: dict | None = None):
        self.enabled = enabled  # False on DDP ranks other than 0: one writer per run
        self.run_dir = Path(run_dir)
        self.backend = logger_cfg.get("backend", "none")
        self.logger_cfg = logger_cfg
        self.group = logger_cfg.get("group") or group
        self.identity = {"group": self.group, **(identity or {})}
        self.config = scrub({**config, "ibridge": self.identity, "run_dir": str(self.run_dir.resolve())})
        self.stage = None
        self._wandb_run = None
        self._home: Path | None = None
        self._start_offset: int | None = None  # where this stage's records begin in metrics.jsonl
        self._restarted = False  # started before in this folder: cut its old records on first log
        self._resumed_id = False
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._osh = _osh_hook(logger_cfg) if self.backend == "wandb" and enabled else None
        self._osh_last = 0.0

    @property
    def mode(self) -> str:
        return str(self.logger_cfg.get("mode", "offline"))

    def start(self, stage: str, name: str, extra_config: dict | None = None, *, home: Path | None = None,
              job_type: str | None = None, group: str | None = None, config: dict | None = None,
              identity: dict | None = None) -> None:
        """Start the wandb run of one stage (job_type `stage` unless given).

        `home`: the stage's folder, where its run id is kept, so that the stage started
        again there continues the same run. `config` replaces the resolved config
        (the cell run's flat axes); the identity block (updated by `identity`) is added either way.
        """
        self.finish()
        self.stage = stage
        self._home, self._start_offset, self._restarted, self._resumed_id = None, None, False, False
        if not self.enabled:
            return
        run_id = None
        if home is not None:
            run_id = self._run_log(Path(home), name)
        if self.backend != "wandb":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        if self._resumed_id and self.mode == "offline":
            self._supersede(run_id)
        base = self.config if config is None else scrub({**config, "run_dir": self.config["run_dir"]})
        base = {**base, "ibridge": {**self.identity, "group": group or self.group, **(identity or {})}}
        self._wandb_run = wandb.init(
            project=self.logger_cfg.get("project", "ibridge"),
            entity=self.logger_cfg.get("entity"),
            group=group or self.group,
            job_type=job_type or stage,
            name=name,
            id=run_id,
            resume="allow" if run_id else None,
            tags=list(self.logger_cfg.get("tags") or []),
            config={**base, **(extra_config or {})},
            dir=str(self.run_dir),
            mode=self.mode,
            reinit="finish_previous",
        )
        if home is not None and not self._resumed_id:
            self._write_run_log(Path(home), name)

    def _run_log(self, home: Path, name: str) -> str | None:
        """The id kept in `home` (a restart), or a new one written there."""
        path = home / RUN_LOG
        record = {}
        if path.is_file():
            try:
                record = json.loads(path.read_text())
            except json.JSONDecodeError:
                record = {}
        if "metrics_offset" in record:
            self._restarted = True
            self._start_offset = int(record["metrics_offset"])
            self._resumed_id = bool(record.get("wandb_id"))
            if self._resumed_id:
                log.info("%s: continuing wandb run %s", name, record["wandb_id"])
            return record.get("wandb_id")
        self._start_offset = self.bookmark()["metrics_offset"]
        if self.backend != "wandb":
            self._write_run_log(home, name)
        return None  # wandb picks the id; start() keeps it

    def _write_run_log(self, home: Path, name: str) -> None:
        from ibridge.io import write_json_atomic

        home.mkdir(parents=True, exist_ok=True)
        wandb_id = self._wandb_run.id if self._wandb_run is not None else None
        write_json_atomic(home / RUN_LOG, {"wandb_id": wandb_id, "name": name, "metrics_offset": self._start_offset})

    def _supersede(self, run_id: str) -> None:
        """Move the earlier offline folders of `run_id` out of the sync glob (`wandb/offline-run-*`)."""
        root = self.run_dir / "wandb"
        for folder in sorted(root.glob(f"offline-run-*-{run_id}")):
            target = root / SUPERSEDED / folder.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(folder), target)

    def log(self, metrics: dict, step: int | None = None) -> None:
        if not self.enabled:
            return
        if self._restarted:
            # The stage runs again from its first step (no saved state to resume): drop
            # what its earlier attempt logged, as a resume drops what came after its state.
            self._truncate(self._start_offset)
            self._restarted = False
        record = {"stage": self.stage, "step": step, **{k: _plain(v) for k, v in metrics.items()}}
        line = json.dumps(record) + "\n"
        # One write of a whole line, so a kill leaves at most one partial last line,
        # which `read_metrics` skips and a resumed stage cuts away.
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(line)
        self.log_wandb(metrics, step)

    def log_wandb(self, metrics: dict, step: int | None = None) -> None:
        """To wandb only (a replay, a table): metrics.jsonl has it already or has no place for it."""
        if self._wandb_run is not None:
            self._wandb_run.log(metrics, step=step)
            self._osh_trigger()

    def bookmark(self) -> dict:
        """Where metrics.jsonl ends now; `rewind` cuts it back to here."""
        return {"metrics_offset": self.metrics_path.stat().st_size if self.metrics_path.exists() else 0}

    def rewind(self, bookmark: dict) -> None:
        """Drop what was logged after `bookmark` (a resumed stage logs it again), and give
        this stage's wandb run the history up to `bookmark` when its offline file lacks it."""
        if not self.enabled:
            return
        offset = int(bookmark.get("metrics_offset", 0))
        self._truncate(offset)
        self._restarted = False
        if self._wandb_run is not None and not (self._resumed_id and self.mode != "offline"):
            for record in _records_between(self.metrics_path, self._start_offset or 0, offset):
                if record.get("stage") == self.stage:
                    step = record.pop("step", None)
                    record.pop("stage", None)
                    self._wandb_run.log(record, step=step)

    def _truncate(self, offset: int | None) -> None:
        if offset is not None and self.metrics_path.exists() and self.metrics_path.stat().st_size > offset:
            with self.metrics_path.open("r+b") as handle:
                handle.truncate(offset)

    def summary(self, metrics: dict) -> None:
        if self._wandb_run is not None:
            for key, value in metrics.items():
                self._wandb_run.summary[key] = value

    def log_image(self, key: str, path: Path, step: int | None = None) -> None:
        if self._wandb_run is not None:
            import wandb

            self.log_wandb({key: wandb.Image(str(path))}, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int | None = None) -> None:
        if self._wandb_run is not None:
            import wandb

            self.log_wandb({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def fail(self, error: BaseException | str) -> None:
        """Finish the open run as failed: non-zero exit code, the error in its summary."""
        message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        if self._wandb_run is not None:
            self.summary({"status": "failed", "error": message})
        self.finish(exit_code=1)

    def finish(self, exit_code: int = 0) -> None:
        self._restarted = False
        if self._wandb_run is not None:
            if exit_code == 0:
                self._wandb_run.summary["status"] = "completed"
            run_folder = Path(self._wandb_run.dir).parent
            self._wandb_run.finish(exit_code=exit_code)
            self._wandb_run = None
            self._osh_trigger(force=True, folder=run_folder)

    def _osh_trigger(self, force: bool = False, folder: Path | None = None) -> None:
        """Ask wandb-osh's login-node syncer to upload this run (rank 0 only; throttled)."""
        if self._osh is None:
            return
        now = time.monotonic()
        every = float(self.logger_cfg.get("osh_every_s", 60))
        if not force and now - self._osh_last < every:
            return
        if folder is None:
            if self._wandb_run is None:
                return
            folder = Path(self._wandb_run.dir).parent
        self._osh_last = now
        self._osh(folder)


def _osh_hook(logger_cfg):
    """wandb-osh's trigger when ``logger.osh=true`` (an optional extra), else None."""
    if not logger_cfg.get("osh", False):
        return None
    from ibridge.config import ConfigError

    if str(logger_cfg.get("mode", "offline")) != "offline":
        raise ConfigError("logger.osh=true: wandb-osh syncs offline runs; expected logger.mode=offline")
    try:
        from wandb_osh.hooks import TriggerWandbSyncHook
    except ImportError:
        raise ConfigError("logger.osh=true needs the wandb-osh package: pip install 'ibridge[osh]'") from None
    directory = logger_cfg.get("osh_dir")
    return TriggerWandbSyncHook(Path(str(directory)).expanduser()) if directory else TriggerWandbSyncHook()


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    return value


def _records_between(path: Path, start: int, end: int) -> list[dict]:
    """The whole records of metrics.jsonl between two byte offsets."""
    if not path.exists() or end <= start:
        return []
    with path.open("rb") as handle:
        handle.seek(start)
        text = handle.read(end - start).decode("utf-8", errors="replace")
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, ignoring a partial last line left by a kill."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
