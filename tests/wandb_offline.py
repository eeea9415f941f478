"""A small reader of wandb's offline run files (``offline-run-*/run-<id>.wandb``), for tests.

wandb 0.31 writes them in LevelDB's log format (the one its old ``datastore``
module read): a 7-byte file header (``:W&B``, magic 0xBEE1, version 0), then
32 KiB blocks of chunks, each ``crc32 (4, little-endian) | length (2) | type (1) |
data``, with type FULL, or FIRST/MIDDLE/LAST pieces of a record that spans blocks;
the CRC is zlib's crc32 of the type byte and the data. Every record is a
``wandb_internal_pb2.Record`` (run, config, history, summary, exit, ...).
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32768
FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    """Every protobuf Record of one .wandb file, in order (checks every chunk's CRC)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path}: not a wandb log (header {ident!r} {magic:#x} v{version})")
    pos, pending, records = FILE_HEADER.size, b"", []
    while pos + CHUNK_HEADER.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER.size:  # a block's tail too short for a header is padding
            pos += left
            continue
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        if crc == 0 and length == 0 and kind == 0:  # zero padding to the block's end
            pos += left
            continue
        chunk = data[pos + CHUNK_HEADER.size : pos + CHUNK_HEADER.size + length]
        if zlib.crc32(bytes([kind]) + chunk) != crc:
            raise ValueError(f"{path}: bad CRC at byte {pos}")
        pos += CHUNK_HEADER.size + length
        if kind == FULL:
            payload = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            payload, pending = pending + chunk, b""
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {pos}")
        record = pb.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def _set_nested(tree: dict, key: str, value) -> None:
    """Config keys come nested (``dpo`` -> {lr: ...}); keep them as one dict per key."""
    tree[key] = value


@dataclass
class OfflineRun:
    folder: Path
    id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    exit_code: int | None = None

    def flat_config(self) -> dict:
        """Config with nested dicts as dotted keys (``dpo.lr``), as the W&B app shows it."""
        out: dict = {}

        def walk(prefix: str, value) -> None:
            if isinstance(value, dict) and value:
                for key, inner in value.items():
                    walk(f"{prefix}.{key}" if prefix else str(key), inner)
            else:
                out[prefix] = value

        walk("", {k: v for k, v in self.config.items() if k != "_wandb"})
        return out

    def history_keys(self) -> set[str]:
        return {key for row in self.history for key in row if not key.startswith("_")}


def read_run(folder: Path) -> OfflineRun:
    """One offline run folder: its identity, config, summary, history and exit code."""
    folder = Path(folder)
    (log,) = folder.glob("run-*.wandb")
    run = OfflineRun(folder=folder)
    for record in read_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            # A run can carry more than one run record (later ones update a few fields and
            # leave the others empty): keep what each one sets.
            for field, value in (("id", r.run_id), ("name", r.display_name), ("group", r.run_group),
                                 ("job_type", r.job_type)):
                if value:
                    setattr(run, field, value)
            for item in r.config.update:
                _set_nested(run.config, _key(item), json.loads(item.value_json))
        elif kind == "config":
            for item in record.config.update:
                _set_nested(run.config, _key(item), json.loads(item.value_json))
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = _key(item)
                value = json.loads(item.value_json)
                if item.nested_key and len(item.nested_key) > 1:  # a media value: keep its top key
                    row.setdefault(item.nested_key[0], {})[item.nested_key[-1]] = value
                else:
                    row[key] = value
            run.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                if item.nested_key and len(item.nested_key) > 1:
                    run.summary.setdefault(item.nested_key[0], {})[item.nested_key[-1]] = json.loads(item.value_json)
                else:
                    run.summary[_key(item)] = json.loads(item.value_json)
            for item in record.summary.remove:
                run.summary.pop(_key(item), None)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def read_runs(root: Path, pattern: str = "**/wandb/offline-run-*") -> list[OfflineRun]:
    """Every offline run below `root` that `wandb sync` would find (not ``superseded/``)."""
    return [read_run(folder) for folder in sorted(Path(root).glob(pattern)) if folder.is_dir()]
