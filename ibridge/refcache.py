"""Reference log-probs: one pass per stage, cached by reference model and data.

DESIGN.md §1 ("Cost"): every objective needs log pi_ref only at the
demonstration's own tokens, and these are fixed during a stage. They are
computed once, stored under ``<cache_dir>/reflogps/<key>.safetensors`` with the
key a hash of the reference weights and of the exact token ids and labels, and
reused by any later run with the same reference and data. A training step then
costs what an SFT step costs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ibridge.data.collate import pad_sequences
from ibridge.objectives.logprobs import token_logps
from ibridge.runtime import Runtime

log = logging.getLogger(__name__)

# Files up to this size are hashed whole; larger ones (multi-GB real models) by
# name, size and modification time, which changes whenever they are rewritten.
FULL_HASH_LIMIT = 512 * 2**20


def _local_folder(path) -> Path:
    """A hub name resolves to its cached snapshot (whose folder names the revision)."""
    local = Path(str(path)).expanduser()
    if local.exists():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), local_files_only=True))
    except Exception:  # not cached: the name alone keys the cache
        return local


def model_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    path = _local_folder(path)
    digest.update(str(path).encode() if not path.exists() else b"")
    for file in sorted(path.glob("*.safetensors")) + sorted(path.glob("config.json")):
        stat = file.stat()
        digest.update(file.name.encode())
        if stat.st_size <= FULL_HASH_LIMIT:
            digest.update(hashlib.sha256(file.read_bytes()).digest())
        else:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def sequences_fingerprint(sequences: list[dict]) -> str:
    digest = hashlib.sha256()
    for seq in sequences:
        digest.update(json.dumps([seq["input_ids"], seq["labels"]]).encode())
    return digest.hexdigest()


@torch.no_grad()
def sequence_token_logps(
    model, sequences: list[dict], runtime: Runtime, pad_id: int, batch_size: int = 64, desc: str | None = None
) -> list[torch.Tensor]:
    """Per-sequence log-probs at each shifted position, (len(input_ids) - 1,), 0.0 where unscored.

    Sequences are sorted by length so that batches carry little padding.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]["input_ids"]))
    out: list[torch.Tensor | None] = [None] * len(sequences)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=desc is None, dynamic_ncols=True):
        chunk = order[start : start + batch_size]
        batch = pad_sequences([sequences[i] for i in chunk], pad_id)
        batch = {key: value.to(runtime.device) for key, value in batch.items()}
        with runtime.autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps, _ = token_logps(logits, batch["labels"])  # (B, T-1)
        logps = logps.float().cpu()
        for row, index in enumerate(chunk):
            out[index] = logps[row, : len(sequences[index]["input_ids"]) - 1].clone()
    model.train(was_training)
    return out  # type: ignore[return-value]


def cached_reference_logps(
    reference_path: Path,
    sequences: list[dict],
    runtime: Runtime,
    pad_id: int,
    cache_dir: Path,
    load_reference,
    batch_size: int = 64,
) -> list[torch.Tensor]:
    """Reference per-token log-probs of `sequences`, from the cache or one reference pass.

    `load_reference()` is called only on a cache miss, so a warm cache never loads
    the reference model at all.
    """
    key = hashlib.sha256(
        (model_fingerprint(reference_path) + sequences_fingerprint(sequences)).encode()
    ).hexdigest()[:24]
    file = Path(cache_dir) / "reflogps" / f"{key}.safetensors"
    if file.is_file():
        stored = load_file(str(file))
        flat, lengths = stored["flat"], stored["lengths"].tolist()
        if len(lengths) == len(sequences):
            log.info("reference log-probs: cache hit %s", file.name)
            return list(torch.split(flat, lengths))
        log.warning("reference log-probs: ignoring malformed cache file %s", file)
    reference = load_reference()
    values = sequence_token_logps(reference, sequences, runtime, pad_id, batch_size, desc="reference pass")
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, suffix=".tmp")
    os.close(fd)
    save_file(
        {"flat": torch.cat(values).contiguous(), "lengths": torch.tensor([len(v) for v in values])}, tmp
    )
    os.replace(tmp, file)
    return values
