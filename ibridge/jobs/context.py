"""What every job gets: config, run folder, runtime, logger, data source, base model."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from omegaconf import DictConfig

from ibridge.models import ensure_toy_base
from ibridge.runtime import Runtime
from ibridge.tracking import RunLogger


@dataclass
class RunContext:
    cfg: DictConfig
    run_dir: Path
    runtime: Runtime
    logger: RunLogger
    source: object
    results: dict = field(default_factory=dict)
    # The cell's name from its overrides (ibridge.naming.cell_tag), e.g. ``jsd-lr1e-4-s0``.
    tag: str = ""
    # A check-only pass over a run that completed earlier (ibridge.cli): each stage and
    # evaluation compares its recorded inputs with today's and computes nothing.
    check_only: bool = False

    @cached_property
    def base_model(self) -> Path | str:
        """The base model: the toy model's folder (built once and cached), or for
        ``model.kind=hf`` ``model.name_or_path`` as given, a hub name
        (``meta-llama/Meta-Llama-3-8B``) or a local folder (``~`` expanded)."""
        if self.cfg.model.kind == "toy":
            # The toy base is pretrained on a world's corpus: the data's world, or the
            # default one when the data comes from files.
            from ibridge.world import WorldConfig

            world = getattr(self.source, "world_config", None) or WorldConfig()
            return ensure_toy_base(self.cfg.model, world, self.runtime)
        name = str(self.cfg.model.name_or_path)
        local = Path(name).expanduser()
        return str(local) if local.exists() or name.startswith((".", "/", "~")) else name

    def run_name(self, kind: str) -> str:
        """``<kind>-<cell tag>``, e.g. ``sft-jsd-lr1e-6-s0``, ``eval-dpo-jsd-lr1e-6-s0``: unique in a sweep."""
        if not self.tag:
            from ibridge.naming import cell_tag

            self.tag = cell_tag(self.cfg, [])
        return f"{kind}-{self.tag}"

    def checkpoint_or_base(self, path) -> Path:
        if path:
            path = Path(str(path)).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"checkpoint={path}: no such folder")
            return path
        return self.base_model
