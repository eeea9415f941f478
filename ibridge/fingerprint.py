"""What a cached reference log-prob depends on: the model's content and the numerics it ran under.

docs/design.md §1 ("Cost") caches ``log pi_ref`` keyed by reference model and data. A cached value
may be served only where a fresh reference pass would compute it under the same conditions, so
the key (``ibridge.refcache.reference_cache_key``) combines

- :func:`model_fingerprint`: the bytes of every weight file, ``config.json``,
  ``adapter_config.json`` and remote-code ``*.py`` of the resolved model folder (and, for a hub
  name, the resolved revision). A PEFT adapter folder (``adapter_config.json``; ``load_model``
  loads the base it names and applies the adapter) also takes in the fingerprint of that base,
  so editing ``lora_alpha`` or replacing the base's weights changes the key. Files over
  :data:`FULL_HASH_LIMIT` are hashed whole once and the digest kept in a small sidecar file, so
  two folders whose multi-GB shards have the same size and modification time never share a key;
- :func:`numerics_fingerprint`: precision, weight dtype, attention implementation, device,
  ``trust_remote_code`` (whether a folder's own modelling code or transformers' runs), and the
  library versions whose kernels produce the numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from ibridge.io import write_json_atomic
from ibridge.models import reference_pass_dtype
from ibridge.runtime import Runtime

log = logging.getLogger(__name__)

# Files up to this size are hashed on every lookup (a config, a toy model: milliseconds); larger
# ones (multi-GB shards; sha256 ran at 0.66 GB/s here) once, with the digest kept in a sidecar (tests lower it).
FULL_HASH_LIMIT = 512 * 2**20
SIDECAR_SUFFIX = ".ibridge-sha256.json"
_READ_BLOCK = 16 * 2**20


def resolve_model_folder(path) -> tuple[Path | None, str | None]:
    """``(folder, revision)``: a local folder as is (revision None); a hub name as its cached
    snapshot, whose folder name is the resolved commit; ``(None, None)`` when not available locally."""
    local = Path(str(path)).expanduser()
    if local.exists():
        return local, None
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(str(path), local_files_only=True))
    except Exception:  # not in the hub cache (or not a hub name): nothing to fingerprint yet
        return None, None
    return snapshot, snapshot.name


def _file_stamp(file: Path) -> dict:
    """What changes whenever the file's bytes may have: size and mtime, and also the inode and
    ctime, which a rewrite or copy changes even when it restores the mtime (``cp -p``, ``os.utime``).
    Follows symlinks: a hub snapshot's entry is stamped by its blob."""
    stat = file.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "ino": stat.st_ino}


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while block := handle.read(_READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _sidecars(file: Path, cache_dir: Path | None, beside: bool = True) -> list[Path]:
    """Where a large file's digest is kept, in order of preference: beside the weights (it travels
    with a folder copied with ``cp -a`` and serves every cache dir), then under the cache dir (a
    read-only or shared folder). A symlink's folder (a hub snapshot) is not ours to write into,
    nor a data folder (``beside=False``), where a ``.json`` sidecar would be read as data."""
    places = [] if file.is_symlink() or not beside else [file.with_name(file.name + SIDECAR_SUFFIX)]
    if cache_dir is not None:
        name = hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:24]
        places.append(Path(cache_dir).expanduser() / "reflogps" / "hashes" / f"{name}.json")
    return places


def content_hash(file: Path, cache_dir: Path | None = None, beside: bool = True) -> str:
    """sha256 of the file's bytes; above :data:`FULL_HASH_LIMIT` computed once per stamp and kept
    in a sidecar, which is trusted only while the file's path and stamp are unchanged
    (``beside=False``: only under `cache_dir`)."""
    file = Path(file)
    stamp = _file_stamp(file)
    if stamp["size"] <= FULL_HASH_LIMIT:
        return _sha256(file)
    record = {"file": str(file.resolve()), "stamp": stamp}
    places = _sidecars(file, cache_dir, beside)
    for place in places:
        try:
            stored = json.loads(place.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(stored, dict) and all(stored.get(k) == v for k, v in record.items()) and stored.get("sha256"):
            return str(stored["sha256"])
    log.info("hashing %s (%.1f GB; once, kept in a sidecar)", file, stamp["size"] / 1e9)
    record["sha256"] = _sha256(file)
    for place in places:
        try:
            write_json_atomic(place, record)
            break
        except OSError:  # read-only folder: try the next place
            continue
    else:
        log.warning("could not keep the digest of %s anywhere (tried %s); it is recomputed next time", file, places)
    return record["sha256"]


def model_fingerprint(path, cache_dir: Path | None = None) -> str | None:
    """Hash of everything in the model folder that changes the reference's outputs, or None when
    the model is not available locally (an uncached hub name: the caller must not trust a cache)."""
    return _fingerprint(path, cache_dir, seen=())


# The files of a model folder whose bytes change its outputs (weights, configuration, remote code).
_MODEL_FILES = ("*.safetensors", "config.json", "adapter_config.json", "*.py")


def _fingerprint(path, cache_dir: Path | None, seen: tuple[str, ...]) -> str | None:
    folder, revision = resolve_model_folder(path)
    if folder is None:
        return None
    files = [f for pattern in _MODEL_FILES for f in sorted(folder.glob(pattern))]
    parts = {"revision": revision, "files": [[f.name, content_hash(f, cache_dir)] for f in files]}
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        base = adapter_base(adapter)
        if str(folder.resolve()) in seen:
            raise ValueError(f"{adapter}: base_model_name_or_path leads back to {folder}")
        parts["base"] = None if base is None else _fingerprint(base, cache_dir, (*seen, str(folder.resolve())))
        if parts["base"] is None:  # a base not available locally: its content is unknown, trust no cache
            return None
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def adapter_base(adapter_config: Path) -> str | None:
    """The base model a PEFT adapter folder names (``base_model_name_or_path``), or None."""
    try:
        base = json.loads(Path(adapter_config).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return str(base) if base else None


def numerics_fingerprint(runtime: Runtime) -> dict:
    """The conditions, besides weights and tokens, that change the reference's log-probs."""
    import transformers

    device = runtime.device
    return {
        "precision": runtime.precision,
        "weights_dtype": str(reference_pass_dtype(runtime)),  # bf16 or fp32 weights (the mode only acts through it)
        "attn_implementation": runtime.attn_implementation,
        "trust_remote_code": bool(runtime.trust_remote_code),  # a folder's own modelling code, or transformers'
        "device": device.type,
        # Kernels differ between GPU generations, and TF32 changes fp32 matmuls on GPUs.
        "accelerator": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
    }
