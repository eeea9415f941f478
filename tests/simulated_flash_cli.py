"""`ibridge` with the simulated flash-attention kernel registered (tests/simulated_flash.py); not
a test module. Usage: python tests/simulated_flash_cli.py [ibridge args...]"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ibridge.cli import main  # noqa: E402
from tests import simulated_flash  # noqa: E402


class _Patch:
    """The one monkeypatch call `simulated_flash.register` makes, done for the whole process."""

    @staticmethod
    def setattr(target, name, value):
        setattr(target, name, value)


if __name__ == "__main__":
    simulated_flash.register(_Patch)
    main(sys.argv[1:])
