"""`ibridge --version`: ibridge's version and those of the libraries that make its numbers."""

from __future__ import annotations

import platform
from importlib import metadata

# The libraries a bug report needs (TRL: what ibridge is compared with, benchmarks/bench_trl.py).
LIBRARIES = ("torch", "transformers", "trl")


def versions() -> dict[str, str]:
    """``{"ibridge": ..., "torch": ..., "transformers": ..., "trl": ..., "python": ...}``; a library
    that is not installed reads ``not installed``. Read from the installed metadata, so that
    nothing is imported (torch alone takes seconds)."""
    from ibridge import __version__

    found = {"ibridge": __version__}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["python"] = platform.python_version()
    return found


def version_text() -> str:
    return "\n".join(f"{name} {version}" for name, version in versions().items())
