"""Metrics to metrics.jsonl and to wandb, organised for dashboards (DESIGN.md §3).

One wandb project; a pipeline's stages share a `group` (a sweep's cells share
the sweep's group); `job_type` is the stage; the run name says the overrides;
the resolved config is the run's config. wandb is offline unless the user asks.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# Environment variables that must never reach a config, a log or wandb's config.
SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


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
    """Writes every metric to `<run_dir>/metrics.jsonl` and, when enabled, to wandb."""

    def __init__(self, run_dir: Path, logger_cfg, config: dict, group: str, enabled: bool = True):
        self.enabled = enabled  # False on DDP ranks other than 0: one writer per run
        self.run_dir = Path(run_dir)
        self.backend = logger_cfg.get("backend", "none")
        self.logger_cfg = logger_cfg
        self.config = scrub(config)
        self.group = logger_cfg.get("group") or group
        self.stage = None
        self._wandb_run = None
        self.metrics_path = self.run_dir / "metrics.jsonl"

    def start(self, stage: str, name: str, extra_config: dict | None = None) -> None:
        self.finish()
        self.stage = stage
        if self.backend != "wandb" or not self.enabled:
            return
        import wandb

        mode = self.logger_cfg.get("mode", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb_run = wandb.init(
            project=self.logger_cfg.get("project", "ibridge"),
            entity=self.logger_cfg.get("entity"),
            group=self.group,
            job_type=stage,
            name=name,
            tags=list(self.logger_cfg.get("tags") or []),
            config={**self.config, **(extra_config or {})},
            dir=str(self.run_dir),
            mode=mode,
            reinit="finish_previous",
        )

    def log(self, metrics: dict, step: int | None = None) -> None:
        if not self.enabled:
            return
        record = {"stage": self.stage, "step": step, **{k: _plain(v) for k, v in metrics.items()}}
        line = json.dumps(record) + "\n"
        # One write of a whole line, so a kill leaves at most one partial last line,
        # which `read_metrics` skips and a resumed stage cuts away.
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(line)
        if self._wandb_run is not None:
            self._wandb_run.log(metrics, step=step)

    def bookmark(self) -> dict:
        """Where metrics.jsonl ends now; `rewind` cuts it back to here."""
        return {"metrics_offset": self.metrics_path.stat().st_size if self.metrics_path.exists() else 0}

    def rewind(self, bookmark: dict) -> None:
        """Drop what was logged after `bookmark` (a resumed stage logs it again)."""
        if not self.enabled:
            return
        offset = int(bookmark.get("metrics_offset", 0))
        if self.metrics_path.exists() and self.metrics_path.stat().st_size > offset:
            with self.metrics_path.open("r+b") as handle:
                handle.truncate(offset)

    def summary(self, metrics: dict) -> None:
        if self._wandb_run is not None:
            for key, value in metrics.items():
                self._wandb_run.summary[key] = value

    def log_image(self, key: str, path: Path) -> None:
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.log({key: wandb.Image(str(path))})

    def finish(self) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    return value


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
