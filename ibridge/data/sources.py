"""Where examples come from: the toy world, or local JSONL files."""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path

from omegaconf import OmegaConf

# Demonstrations held back from training, to measure drift (kl/token) on data the
# stage did not fit.
HELDOUT_DEMONSTRATIONS = 64


def _plain(cfg) -> dict:
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


class ToySource:
    """The synthetic world of DESIGN.md §2, built deterministically from its config."""

    kinds = ("demonstrations", "preferences", "heldout_pairs", "eval")

    def __init__(self, data_cfg: Mapping):
        from ibridge.world import WorldConfig

        self.world_config = WorldConfig.from_mapping(_plain(data_cfg)["world"])

    @cached_property
    def world(self):
        from ibridge.world import build_world

        return build_world(self.world_config)

    def examples(self, kind: str) -> list[dict]:
        demos = self.world.demonstrations
        keep = max(len(demos) - HELDOUT_DEMONSTRATIONS, len(demos) // 2)
        if kind == "demonstrations":
            return demos[:keep]
        if kind == "heldout_demonstrations":
            return demos[keep:]
        if kind == "preferences":
            return self.world.preferences
        if kind == "heldout_pairs":
            return self.world.heldout_pairs
        if kind == "eval":
            return self.world.eval
        raise KeyError(f"toy data has no split {kind!r}; expected one of {', '.join(self.kinds)}")


REQUIRED_FIELDS = {
    "demonstrations": ("prompt", "response"),
    "preferences": ("prompt", "chosen", "rejected"),
}


class JsonlSource:
    """Local JSON-lines files: one example per line with the fields of its kind.

    ``data.path`` is the training file; ``data.heldout_path`` (optional) a file of
    the same kind kept out of training.
    """

    def __init__(self, data_cfg: Mapping):
        cfg = _plain(data_cfg)
        self.example_kind = cfg.get("examples", "demonstrations")
        if self.example_kind not in REQUIRED_FIELDS:
            raise ValueError(
                f"data.examples={self.example_kind!r}: expected one of {', '.join(REQUIRED_FIELDS)}"
            )
        self.path = Path(cfg["path"]).expanduser() if cfg.get("path") else None
        self.heldout_path = Path(cfg["heldout_path"]).expanduser() if cfg.get("heldout_path") else None
        self.kinds = (self.example_kind,)

    def examples(self, kind: str) -> list[dict]:
        if kind == self.example_kind:
            return read_jsonl(self.path, REQUIRED_FIELDS[kind])
        heldout = {"demonstrations": "heldout_demonstrations", "preferences": "heldout_pairs"}
        if kind == heldout[self.example_kind]:
            return read_jsonl(self.heldout_path, REQUIRED_FIELDS[self.example_kind]) if self.heldout_path else []
        raise KeyError(f"data={self.path} holds {self.example_kind}, not {kind}")


def read_jsonl(path: Path | None, fields: tuple[str, ...]) -> list[dict]:
    """Read a JSONL file, failing with the file and line of the first bad row."""
    if path is None:
        raise ValueError("data.path is not set: expected a JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"data.path={path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object with fields {', '.join(fields)}")
            missing = [field for field in fields if field not in row]
            if missing:
                raise ValueError(f"{path}:{line_no}: missing field(s) {', '.join(missing)}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows
