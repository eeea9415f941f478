"""Where ibridge finds its own files: the Hydra configs, in a checkout or in an installed wheel.

The configs live in ``conf/`` at the top of the repository, beside ``ibridge/`` (a checkout,
and an editable install, read them there); a wheel carries them inside the package as
``ibridge/conf`` (setup.py). docs/design.md §3 describes the config groups.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The folder holding ``config.yaml``: ``ibridge/conf`` when installed from a wheel, else the
    repository's ``conf/``. The package's own copy comes first: beside an installed package is
    site-packages, where another distribution may have put a ``conf/`` of its own."""
    for candidate in (PACKAGE_DIR / "conf", PACKAGE_DIR.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"ibridge's configs are missing: no config.yaml in {PACKAGE_DIR / 'conf'} (an installed "
                            f"wheel) nor in {PACKAGE_DIR.parent / 'conf'} (a checkout); reinstall ibridge")
