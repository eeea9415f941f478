"""The launcher class Hydra instantiates for ``hydra/launcher=slurm`` (ibridge/slurm/launcher.py)."""

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

from ibridge.slurm.launcher import CellLauncherMixin


class SlurmCellLauncher(CellLauncherMixin, SlurmLauncher):
    """Hydra's submitit Slurm launcher, each cell a job of one or many ranks."""
