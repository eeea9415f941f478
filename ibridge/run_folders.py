"""Run folder names that paste back into an override, and a run folder as a checkpoint.

A single run's folder is ``outputs/<job>/<name>`` and a sweep cell's ``<sweep>/<n>_<name>``,
where ``<name>`` spells the command's overrides (docs/design.md §3) in characters Hydra reads
unquoted and shells leave alone: ``key-value`` items joined by ``+``, sorted, e.g.
``lr-1e-4+objective-jsd`` (``default`` without overrides). So every path ibridge prints can
be given back as it is: ``checkpoint=outputs/train/lr-1e-4+objective-jsd``. The overrides
themselves are kept in the run's results.json and ``.hydra/overrides.yaml``.

``checkpoint=`` and ``reference=`` take a model folder, a stage folder (``<run>/sft``) or a
whole run folder, whose stage checkpoint is found in it (:func:`stage_checkpoint`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from omegaconf import OmegaConf

from ibridge.config import ConfigError
from ibridge.sweep_layout import REPORT_FOLDER

log = logging.getLogger(__name__)

# conf/config.yaml, hydra.job.config.override_dirname: how Hydra joins the overrides.
KEY_VALUE_SEP, ITEM_SEP = "-", "+"
# Characters kept in a folder name: those Hydra's override grammar takes unquoted, less the
# ones a shell expands ($ * ? | \). Anything else (= , / : quotes brackets spaces) becomes _.
_UNSAFE = re.compile(r"[^A-Za-z0-9._+@%-]")
MAX_NAME = 200  # bytes; file systems stop at 255
STAGES = ("sft", "dpo")


def folder_name(override_dirname: str) -> str:
    """A run folder's name from Hydra's ``override_dirname``: ``default`` when empty, only safe
    characters, and cut (with a hash of the whole) when too long for a file system."""
    name = _UNSAFE.sub("_", override_dirname or "default")
    if len(name.encode()) > MAX_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        name = f"{name.encode()[: MAX_NAME - 11].decode(errors='ignore')}{ITEM_SEP}{digest}"
    return name


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def stage_checkpoint(value, key: str, prefer: str | None = None) -> tuple[Path, str | None]:
    """``(model folder, stage)`` for a ``checkpoint=`` / ``reference=`` value.

    A model folder is itself (stage None); a stage folder (``<run>/sft``) its ``checkpoint/``;
    a run folder the checkpoint of its one finished stage, or of `prefer` when it has several
    (``train objective=dpo checkpoint=<pipeline run>`` starts from its ``sft``). A run folder
    without a stage checkpoint, or with several and no preference, is a ConfigError that says
    what to pass instead. A path that does not exist is returned as it is (validation names it).
    """
    path = Path(str(value)).expanduser()
    if not path.is_dir() or _is_model_folder(path):
        return path, None
    if _is_model_folder(path / "checkpoint"):
        return path / "checkpoint", path.name
    found = [stage for stage in STAGES if _is_model_folder(path / stage / "checkpoint")]
    if prefer in found:
        return path / prefer / "checkpoint", prefer
    if len(found) == 1:
        return path / found[0] / "checkpoint", found[0]
    if not found:
        raise ConfigError(f"{key}={value}: neither a model folder (config.json) nor a run folder with a stage "
                          f"checkpoint ({', '.join(f'{s}/checkpoint' for s in STAGES)})")
    choices = " or ".join(f"{key}={Path(str(value)) / stage}" for stage in found)
    raise ConfigError(f"{key}={value}: a run folder with {len(found)} stage checkpoints ({', '.join(found)}); "
                      f"name one: {choices}")


def resolve_checkpoints(cfg) -> None:
    """Replace a run or stage folder given as ``checkpoint`` / ``reference`` by the model folder in
    it, in place, and say which stage was picked."""
    from ibridge.stage_settings import trained_stage

    prefer = None
    if OmegaConf.select(cfg, "job") == "train":
        try:
            prefer = "sft" if trained_stage(cfg) == "dpo" else None  # DPO starts from the SFT model
        except (KeyError, ValueError):  # an unknown objective: validation names it
            prefer = None
    for key in ("checkpoint", "reference"):
        value = OmegaConf.select(cfg, key, default=None)
        if not value:
            continue
        resolved, stage = stage_checkpoint(value, key, prefer if key == "checkpoint" else None)
        if stage is not None:
            log.info("%s=%s: the %s stage's checkpoint, %s", key, value, stage, resolved)
            OmegaConf.update(cfg, key, str(resolved))


# --------------------------------------------------------------------------- a sweep's report run

SWEEPS_ROOT = Path("multirun")  # where `ibridge report` looks for the newest sweep (ibridge/jobs/report.py)


def report_sweep(report_path) -> Path | None:
    """The sweep `ibridge report` reads: ``report.path``, else the newest under multirun/;
    None when there is none (the job then says so)."""
    if report_path:
        sweep = Path(str(report_path)).expanduser()
        return sweep if sweep.is_dir() else None
    from ibridge.analysis.runs import newest_sweep

    try:
        return newest_sweep(SWEEPS_ROOT)
    except FileNotFoundError:
        return None


def run_folder(job: str, name: str, report_path=None) -> str:
    """``hydra.run.dir``: ``outputs/<job>/<name>``, and for `report` ``<sweep>/report/<name>``, so
    that each sweep's report run (and the wandb run id its run_log.json keeps) lives with that
    sweep: reporting a second sweep never continues the first one's run (ibridge/sweep_layout.py)."""
    if job == "report":
        sweep = report_sweep(report_path)
        if sweep is not None:
            return str(sweep / REPORT_FOLDER / name)
    return f"outputs/{job}/{name}"
