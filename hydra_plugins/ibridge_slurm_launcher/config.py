"""The schema of ``hydra/launcher=slurm`` and ``slurm_torchrun`` (conf/hydra/launcher/*.yaml).

Hydra's submitit schema (``SlurmQueueConf``) plus two keys of ibridge's own, registered as
``hydra/launcher/ibridge_slurm`` when Hydra scans its plugins.
"""

from dataclasses import dataclass, field
from typing import List  # noqa: UP035 - OmegaConf's structured configs read typing's forms

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf


@dataclass
class SlurmCellConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.ibridge_slurm_launcher.ibridge_slurm_launcher.SlurmCellLauncher"
    # null: each Slurm task is one rank (tasks_per_node x nodes ranks). N: each node runs one
    # task, which starts `torchrun --nproc_per_node N` (nodes x N ranks); tasks_per_node must be 1.
    nproc_per_node: int | None = None  # noqa: UP007
    # One failing task ends the whole step at once instead of leaving the others waiting in a collective.
    srun_args: List[str] = field(default_factory=lambda: ["--kill-on-bad-exit=1"])  # noqa: UP006


ConfigStore.instance().store(group="hydra/launcher", name="ibridge_slurm", node=SlurmCellConf, provider="ibridge")
