"""Grid cells as Slurm jobs of one or many ranks (``ibridge -m hydra/launcher=slurm ...``).

docs/real_setting.md#slurm is the user's account; the pieces:

* ``launcher.py``: the launcher (its class and config schema are in
  hydra_plugins/ibridge_slurm_launcher/, where Hydra looks for plugins): it submits the sweep
  (one array job, one element per cell) and waits for it (``queue.py``, without ``sacct``);
* ``cell.py``: what each Slurm task runs: one rank of the cell's torch.distributed job (rank,
  world size and master address from Slurm; ibridge/launch_env.py), with the preemption
  signal saving the training state and requeueing the job;
* ``torchrun_cell.py``: the other shape, one task per node that starts torchrun;
* ``outcome.py``: every task's outcome turned into the cell's status for the sweep table.
"""
