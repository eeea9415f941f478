"""Reference log-probs: one pass per stage, cached by reference model, data and numerics.

docs/design.md §1 ("Cost"): every objective needs log pi_ref only at the
demonstration's own tokens, and these are fixed during a stage. They are
computed once, stored under ``<cache_dir>/reflogps/<key>.safetensors`` with the
key from :func:`reference_cache_key` (the reference's content, the exact token
ids and labels, and the numerics of the pass), and reused by any later run with
the same reference, data and numerics. A training step then costs what an SFT
step costs.

The pass itself scores only: weights in the run's compute dtype
(``load_model(..., for_inference=True)``), no KV cache, float32 log-probs chunk by
chunk (``ibridge.objectives.logprobs``), and batches bounded by padded tokens, not rows.

Under torchrun the pass is sharded: every rank loads the reference whole and scores its
share of the batches (the same batches one process would form, so the same numbers), the
values are gathered to every rank, and rank 0 alone looks the cache up and writes it (its
decision is broadcast, so all ranks take the same branch).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ibridge.data.collate import pad_sequences
from ibridge.distributed import DistInfo, all_gather_objects, broadcast_from_main, shard_of
from ibridge.fingerprint import model_fingerprint, numerics_fingerprint
from ibridge.io import honour_umask
from ibridge.models import load_model, reference_pass_dtype
from ibridge.packing import PackedForward, scored_logps
from ibridge.progress import progress_bar
from ibridge.runtime import Runtime

log = logging.getLogger(__name__)

# Bump when the reference pass computes differently in code (2: weights loaded in the compute
# dtype instead of fp32 weights under autocast; 3: packed forward and log-probs at labelled
# tokens only, which rounds differently), so older entries are not served.
REFERENCE_PASS_VERSION = 3

# Padded tokens (rows x longest sequence) per forward of a scoring pass. Bounds the logits of a
# model without a plain head too (8192 x 128k vocabulary in bf16 is 2 GiB); with one, the
# chunked head keeps them to a chunk.
DEFAULT_MAX_BATCH_TOKENS = 8192


def _ids(values) -> list[int]:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def sequences_fingerprint(sequences: list[dict]) -> str:
    digest = hashlib.sha256()
    for seq in sequences:
        digest.update(json.dumps([_ids(seq["input_ids"]), _ids(seq["labels"])]).encode())
    return digest.hexdigest()


def reference_cache_key(model_print: str, sequences: list[dict], runtime: Runtime) -> str:
    """The cache key of a reference pass: a cached entry is served only when all of these match.

    - ``model``: :func:`ibridge.fingerprint.model_fingerprint` of the reference (file contents,
      hub revision);
    - ``sequences``: the exact token ids and labels, in order;
    - ``numerics``: :func:`ibridge.fingerprint.numerics_fingerprint` (precision and weight dtype, trust_remote_code,
      attention implementation, device, torch/CUDA/transformers versions);
    - ``pass``: :data:`REFERENCE_PASS_VERSION`.

    The token budget of the batches is not part of it: padding is masked, so it changes results
    only by float rounding (tests/test_refcache.py checks several budgets against unbatched scoring).
    """
    parts = {
        "pass": REFERENCE_PASS_VERSION,
        "model": model_print,
        "sequences": sequences_fingerprint(sequences),
        "numerics": numerics_fingerprint(runtime),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def token_budget_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped so that each batch's padded size (rows x longest) is at most `max_tokens`.

    Longest first (an out-of-memory shows at once, not at the end of a long pass), similar
    lengths together so little is padding; a sequence longer than the budget goes alone.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: expected a positive number of tokens per batch")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        # Sorted longest first, so a batch's first sequence sets its padded length.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


@torch.no_grad()
def sequence_token_logps(
    model,
    sequences: list[dict],
    runtime: Runtime,
    pad_id: int,
    max_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    desc: str | None = None,
    shard: DistInfo | None = None,
) -> list[torch.Tensor]:
    """Per-sequence log-probs at each shifted position, (len(input_ids) - 1,) float32, 0.0 where unscored.

    Scoring only: no KV cache (``use_cache=False``), batches of at most `max_tokens` padded
    tokens (:func:`token_budget_batches`), through the training loop's forward
    (:class:`~ibridge.packing.PackedForward`): packed where the attention path can pack, and
    log-probs at labelled tokens only, by the chunked head where the model has a plain one
    (ibridge/lmhead.py). So no (B, T, V) logits are built: at a 128k vocabulary they were most
    of the DPO stage's peak memory (BENCHMARKS.md, realistic shapes).

    With `shard` (several ranks, every one calling), each rank scores every world_size-th
    batch of the one-process plan and the values are gathered: every rank returns the whole
    list, each value from the same batch (same padding) as in one process. `model` must be
    whole on every rank (no collective in its forward: ranks run different numbers of batches).
    """
    was_training = model.training
    model.eval()
    forward = PackedForward(model, fused_head=True)
    lengths = [len(seq["input_ids"]) for seq in sequences]
    out: list[torch.Tensor | None] = [None] * len(sequences)
    batches = token_budget_batches(lengths, max_tokens)
    if shard is not None and shard.enabled:
        batches = [batches[k] for k in shard_of(len(batches), shard)]
    for chunk in progress_bar(batches, desc=desc, unit="batch", disable=desc is None):
        batch = pad_sequences([sequences[i] for i in chunk], pad_id)
        batch = {key: value.to(runtime.device) for key, value in batch.items()}
        with runtime.autocast():
            logps, _ = scored_logps(forward, batch)  # (B, T-1) float32, 0.0 where unscored
        logps = logps.float().cpu()
        for row, index in enumerate(chunk):
            out[index] = logps[row, : lengths[index] - 1].clone()
    model.train(was_training)
    if shard is not None and shard.enabled:
        out = _gathered(out, shard)
    return out  # type: ignore[return-value]


def _flat(values: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Variable-length values as one tensor and their lengths: one object to store or send."""
    flat = torch.cat(values).contiguous() if values else torch.zeros(0, dtype=torch.float32)
    return flat, [len(v) for v in values]


def _split(flat: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    return list(torch.split(flat, lengths)) if lengths else []


def _gathered(partial: list[torch.Tensor | None], info: DistInfo) -> list[torch.Tensor]:
    """Each rank's computed values (None elsewhere) merged into the whole list on every rank.
    One flat tensor per rank travels (pickling 10^5 small tensors one by one costs more)."""
    mine = [i for i, value in enumerate(partial) if value is not None]
    merged = list(partial)
    for indices, flat, lengths in all_gather_objects((mine, *_flat([partial[i] for i in mine])), info):
        for index, value in zip(indices, _split(flat, lengths), strict=True):
            merged[index] = value
    missing = sum(value is None for value in merged)
    if missing:
        raise RuntimeError(f"reference pass: {missing} of {len(merged)} sequences were scored by no rank")
    return merged  # type: ignore[return-value]


def _read(file: Path, n_sequences: int) -> tuple[torch.Tensor, list[int]] | None:
    """A cache entry as ``(flat, lengths)``; None when absent or malformed."""
    if not file.is_file():
        return None
    stored = load_file(str(file))
    flat, lengths = stored["flat"], stored["lengths"].tolist()
    if len(lengths) == n_sequences:
        log.info("reference log-probs: cache hit %s", file.name)
        return flat, lengths
    log.warning("reference log-probs: ignoring malformed cache file %s", file)
    return None


def _write(file: Path, values: list[torch.Tensor]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, suffix=".tmp")
    os.close(fd)
    flat, lengths = _flat(values)
    save_file({"flat": flat, "lengths": torch.tensor(lengths, dtype=torch.long)}, tmp)
    honour_umask(Path(tmp))  # save_file writes 0600: a shared cache must stay readable by the group
    os.replace(tmp, file)


def cached_reference_logps(
    reference_path: Path,
    sequences: list[dict],
    runtime: Runtime,
    pad_id: int,
    cache_dir: Path,
    load_reference=None,
    max_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
) -> list[torch.Tensor]:
    """Reference per-token log-probs of `sequences`, from the cache or one reference pass.

    `load_reference()` (default: ``load_model(reference_path, runtime, for_inference=True,
    dtype=reference_pass_dtype(runtime))``) is called only on a cache miss, so a warm cache
    never loads the reference model at all. The pass runs on the weights
    :func:`ibridge.models.reference_pass_dtype` names (the numerics training runs with), the
    dtype the key names: a loader that gives other weights is replaced by that default. The
    model is freed before returning.

    Under torchrun every rank calls it and every rank returns the same values. Rank 0 alone
    fingerprints the reference, reads and writes the cache (the cache folder need not be
    shared between nodes); its hit or miss is broadcast. A hit is sent to the others; on a
    miss every rank loads the reference whole and scores its share of the batches
    (:func:`sequence_token_logps` with ``shard``), gathered to every rank.
    """
    info = runtime.dist
    cache_dir = Path(cache_dir).expanduser()
    folder = cache_dir / "reflogps"
    model_print, cached = None, None
    if info.is_main:
        model_print = model_fingerprint(reference_path, cache_dir)
        if model_print is None:  # an uncached hub name: its revision is known only once loaded
            log.info("reference log-probs: %s is not available locally; no cache lookup", reference_path)
        else:
            key = reference_cache_key(model_print, sequences, runtime)
            cached = _read(folder / f"{key}.safetensors", len(sequences))
    # Rank 0's decision on every rank: all of them take the same branch (and collectives).
    if broadcast_from_main(cached is not None, info):
        return _split(*broadcast_from_main(cached, info))
    reference = load_reference() if load_reference is not None else None
    weights = reference_pass_dtype(runtime)
    if reference is None or next(reference.parameters()).dtype != weights:
        if reference is not None:
            # The key names the compute dtype; casting afterwards is not the same model (it
            # would also cast the fp32 rotary buffers), so load it as the key says.
            log.warning("reference log-probs: load_reference() gave %s weights, the pass runs in %s: "
                        "reloading it so", next(reference.parameters()).dtype, weights)
            del reference
            gc.collect()
        reference = load_model(reference_path, runtime, for_inference=True, dtype=weights)
    if info.enabled:
        log.info("reference pass: %d sequences sharded over %d ranks", len(sequences), info.world_size)
    values = sequence_token_logps(reference, sequences, runtime, pad_id, max_tokens,
                                  desc="reference pass" if info.is_main else None, shard=info)
    # Free the reference before the caller loads the policy.
    del reference
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if not info.is_main:
        return values
    model_print = model_print or model_fingerprint(reference_path, cache_dir)
    if model_print is None:
        log.warning("reference log-probs: %s still not resolvable to local files; not cached", reference_path)
    else:
        _write(folder / f"{reference_cache_key(model_print, sequences, runtime)}.safetensors", values)
    return values
