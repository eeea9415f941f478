"""Judgments cached once paid for: ``$IBRIDGE_CACHE/judgments/<k[:2]>/<k>.json``.

Shared like the reference log-probs (`ibridge.refcache`): every run, sweep cell and
``ibridge eval`` with the same cache folder reads it. The key (:func:`judgment_key`) is a
hash of the judge (annotator, model, decoding and parser settings, the template's text),
the instruction, the model's output, the reference output and which of the two the judge
saw first; a change to any of them misses. Entries are written atomically, each as soon as
its answer arrives, so an interrupted judging keeps every judgment it received.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from ibridge.io import write_json_atomic

log = logging.getLogger(__name__)

# Bump when what an entry holds, or how a preference is computed from it, changes.
JUDGMENT_VERSION = 1


def judgment_key(judge: dict, instruction: str, output: str, reference: str, model_first: bool) -> str:
    """sha256 of everything the judgment depends on (see the module docstring)."""
    parts = {"version": JUDGMENT_VERSION, "judge": judge, "instruction": instruction, "output": output,
             "reference": reference, "model_first": bool(model_first)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class JudgmentCache:
    """Read and write cached judgments under ``<cache_dir>/judgments``."""

    def __init__(self, cache_dir: Path):
        self.folder = Path(cache_dir).expanduser() / "judgments"

    def _file(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        """The cached judgment, or None when absent or unreadable (then judged again)."""
        file = self._file(key)
        if not file.is_file():
            return None
        try:
            record = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            log.warning("judgment cache: ignoring unreadable %s (%s)", file, err)
            return None
        return record if isinstance(record, dict) and record.get("key") == key else None

    def put(self, key: str, record: dict) -> None:
        write_json_atomic(self._file(key), {**record, "key": key})
