"""Composing a config outside a run, and Hydra's composition errors as one line (docs/design.md §3).

The command line composes a run's overrides before Hydra does (a single run's, a sweep's
cells, the config that ``--help`` describes), so that an unknown key or option is one line
naming it rather than Hydra's several-line message.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

HYDRA_PREFIXES = ("hydra.", "hydra/")


def task_overrides(args: list[str]) -> list[str]:
    """The overrides a run's config is composed from: ``key=value`` words, not Hydra's own."""
    return [a for a in args if "=" in a and not a.startswith("-") and not a.lstrip("+~").startswith(HYDRA_PREFIXES)]


def compose(conf_dir: Path, overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """The composed config (raises Hydra's or OmegaConf's error)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=return_hydra_config)


def composition_message(err: BaseException) -> str:
    """Hydra's composition error in one line: its first line, the key, and the valid options."""
    text = f"{err}\n{err.__cause__ or ''}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    parts = [lines[0]] + [line for line in lines if line.startswith("Key ")]
    if any(line.startswith("Available options") for line in lines):
        start = next(i for i, line in enumerate(lines) if line.startswith("Available options")) + 1
        end = next((i for i, line in enumerate(lines) if line.startswith("Config search path")), len(lines))
        parts.append("valid options: " + ", ".join(lines[start:end]))
    return "; ".join(parts)


def composition_errors() -> tuple[type, ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return HydraException, OmegaConfBaseException
