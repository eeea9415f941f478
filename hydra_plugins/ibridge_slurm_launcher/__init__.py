"""ibridge's Slurm launcher as a Hydra plugin (Hydra instantiates launchers from `hydra_plugins` only).

The logic lives in ibridge/slurm/; this package holds the class Hydra instantiates and its
config schema (registered in Hydra's ConfigStore when Hydra scans its plugins).
"""
