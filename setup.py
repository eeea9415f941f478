"""Packaging of what pyproject.toml cannot say: the configs.

The Hydra configs live in conf/ at the top of the repository, beside ibridge/ (the layout the
docs, tests and scripts use); the wheel carries them inside the package as ``ibridge/conf``,
where an installed ibridge finds them (``ibridge.paths.config_dir``). Each config folder is
named as a package of its own (``ibridge.conf.model``, ...), so that setuptools installs its
YAML files as the data of a known package.
"""

from pathlib import Path

from setuptools import find_namespace_packages, find_packages, setup

CONF = Path("conf")
CONF_PACKAGES = ["ibridge.conf"] + [
    "ibridge.conf." + ".".join(folder.relative_to(CONF).parts)
    for folder in sorted(CONF.rglob("*")) if folder.is_dir() and not folder.name.startswith((".", "__"))
]

setup(
    packages=[*find_packages(include=["ibridge", "ibridge.*"]), *CONF_PACKAGES,
              # the Slurm launcher, found by Hydra in its hydra_plugins namespace
              *find_namespace_packages(include=["hydra_plugins.*"])],
    package_dir={"ibridge.conf": "conf"},
    package_data={name: ["*.yaml"] for name in CONF_PACKAGES},
)
