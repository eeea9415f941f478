"""Atomic writes: a kill at any moment leaves either the old file or the new one.

Files and folders are created under a temporary name by ``tempfile.mkstemp`` / ``mkdtemp``,
which make them private (0600 / 0700) whatever the umask; they are given the mode an ordinary
``open`` / ``mkdir`` would (0666 / 0777 less the umask) before they are renamed into place, so
that results, checkpoints and the shared caches can be read by whoever the umask lets read them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc/self/status``,
    Linux >= 4.7); elsewhere set and at once restored (the only portable way)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file(folder: Path, prefix: str = "", suffix: str = ".tmp") -> tuple[int, str]:
    """``tempfile.mkstemp`` whose file has the umask's mode, not 0600: ``(fd, path)``."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, tmp


def write_json_atomic(path: Path, payload) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, sort_keys=False, default=_jsonable)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def honour_umask(path: Path) -> None:
    """Give a file, or a folder and everything in it, the mode ``open``/``mkdir`` would have given
    it under the umask: safetensors writes its files 0600, mkdtemp its folders 0700."""
    path = Path(path)
    mask = current_umask()
    for entry in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not entry.is_symlink():
            entry.chmod((0o777 if entry.is_dir() else 0o666) & ~mask)


def publish_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a completely written folder into place (replacing an older one), with the modes the
    umask asks for (:func:`honour_umask`)."""
    final_dir = Path(final_dir)
    honour_umask(tmp_dir)
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


def staging_dir(final_dir: Path) -> Path:
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=final_dir.parent, prefix=f".{final_dir.name}.", suffix=".tmp"))
