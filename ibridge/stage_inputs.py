"""What a stage or an evaluation was computed from, so that a rerun never returns a stale result.

A run folder is named by its overrides, so running the same command again finds it, skips
what finished and resumes what was cut short (docs/design.md §3). The config alone cannot say
whether a finished stage still holds: the file behind ``data.path`` may have been edited, the
checkpoint a stage starts from retrained in place, the toy base rebuilt, ibridge or torch
upgraded. So every training stage and every evaluation records what it read, in
``<stage folder>/inputs.json``, before it starts:

- ``data``: for each data config it reads (``data``, ``data.preferences_from``, ...), the
  sha256 of every local data file (:func:`ibridge.fingerprint.content_hash`), or for a hub
  dataset its name, splits and the revision found in the local hub cache; for the toy world
  its config (the world is built from it by the code below);
- ``models``: per role (``init``, ``reference``, ``policy``, ``judge``) the weights
  (:func:`ibridge.fingerprint.model_fingerprint`, as the reference cache keys them) and the
  tokenizer and generation files, which change the token ids and the decoding;
- ``code``: :data:`NUMERICS_VERSION` and the versions of torch and transformers (and peft
  when LoRA trains), whose kernels produce the numbers.

A rerun that finds the stage finished (or a saved state to resume) compares, and when any of
these changed stops with one line that names what changed, rather than return the old
result: ``resume=false`` starts the run over, the earlier one kept as ``<folder>.bak-<time>``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ibridge.io import write_json_atomic

# ibridge.fingerprint (torch, transformers) is imported where it is used: the CLI imports this
# module for StaleRunError before it knows whether a model will load at all.

log = logging.getLogger(__name__)

INPUTS_FILE = "inputs.json"
# Bump when a change to ibridge's code changes what a finished stage or evaluation computed
# (its parameters or its metrics), so that results of the older code are not served as current.
NUMERICS_VERSION = 1
# Model files besides the weights and config.json (which model_fingerprint covers) that change
# what a stage computes: the tokenizer (token ids, chat template) and the generation defaults.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
# The data a stage or evaluation reads, by the kinds of examples it asks its source for.
SFT_KINDS = ("demonstrations", "heldout_demonstrations")
DPO_KINDS = ("preferences",)
EVAL_KINDS = ("eval", "heldout_pairs")


class StaleRunError(Exception):
    """A finished (or resumable) stage's inputs changed since it ran; the message says which."""


class UnfinishedUnit(Exception):
    """Raised in a check-only pass (``RunContext.check_only``) by a stage or evaluation that has
    no finished result to check: the run is not complete after all, and runs instead."""


def check_only_stop(ctx, what: str) -> None:
    """In a check-only pass, stop before `what` computes anything (see UnfinishedUnit)."""
    if getattr(ctx, "check_only", False):
        raise UnfinishedUnit(what)


# --------------------------------------------------------------------------- what a unit read


def _location_files(path: Path, cache_dir: Path | None = None) -> dict[str, str]:
    """sha256 of every data file a ``data.path`` / ``data.heldout_path`` may read, by name (the
    digest of a large file kept under `cache_dir`, never in the data folder)."""
    from ibridge.data.readers import data_files, is_saved_dataset
    from ibridge.fingerprint import content_hash

    if path.is_file():
        return {path.name: content_hash(path, cache_dir, beside=False)}
    if not path.is_dir():
        return {}
    if is_saved_dataset(path):  # arrow shards and their metadata, whatever their names
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
    else:
        files = data_files(path)
    return {str(f.relative_to(path)): content_hash(f, cache_dir, beside=False) for f in files}


def hub_dataset_revision(name: str) -> str | None:
    """The commit of a hub dataset's snapshot in the local hub cache, or None when none is there."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name), repo_type="dataset", local_files_only=True)).name
    except Exception:  # not cached (or not a hub name): name and split are all there is to record
        return None


def _provider_inputs(provider, cache_dir: Path | None = None) -> tuple[str, dict]:
    """``(config key, what it reads)`` for one data source (not a composite)."""
    world = getattr(provider, "world_config", None)
    if world is not None:  # the toy world: built from its config by this code
        import dataclasses

        return "data", {"world": dataclasses.asdict(world)}
    key = str(getattr(provider, "key", "data"))
    record: dict = {}
    for field in ("path", "heldout_path"):
        location = getattr(provider, field, None)
        if location is not None:
            record[field] = _location_files(Path(location), cache_dir)
    dataset = getattr(provider, "dataset", None)
    if dataset and getattr(provider, "path", None) is None:
        record["hub"] = {"dataset": str(dataset), "split": provider.split, "heldout_split": provider.heldout_split,
                         "revision": hub_dataset_revision(dataset)}
    return key, record


def data_inputs(source, kinds: tuple[str, ...], cache_dir: Path | None = None) -> dict:
    """What `source` reads for `kinds`, by the data config that supplies each of them."""
    out: dict = {}
    for kind in kinds:
        if kind not in getattr(source, "kinds", ()):
            continue
        provider = source.source_of(kind) if hasattr(source, "source_of") else source
        key, record = _provider_inputs(provider, cache_dir)
        out[key] = record
    return out


def model_inputs(path, cache_dir: Path | None = None) -> dict:
    """Weights (as the reference cache keys them) and tokenizer files of a model folder or hub name."""
    from ibridge.fingerprint import content_hash, model_fingerprint, resolve_model_folder

    folder, _ = resolve_model_folder(path)
    tokenizer = {}
    if folder is not None:
        tokenizer = {name: content_hash(folder / name, cache_dir) for name in TOKENIZER_FILES
                     if (folder / name).is_file()}
    return {"weights": model_fingerprint(path, cache_dir), "tokenizer": tokenizer}


def code_inputs(lora: bool = False) -> dict:
    import torch
    import transformers

    code = {"ibridge numerics": NUMERICS_VERSION, "torch": torch.__version__, "transformers": transformers.__version__}
    if lora:
        import peft

        code["peft"] = peft.__version__
    return code


def unit_inputs(ctx, kinds: tuple[str, ...], models: dict) -> dict:
    """Everything a stage or evaluation of `ctx`'s run reads: data for `kinds`, the `models`
    (role -> path; None entries left out) and the code."""
    from ibridge.models import cache_root

    cache = cache_root(ctx.cfg.model)
    lora = bool(ctx.cfg.model.get("lora", {}).get("enabled", False))
    inputs = {
        "data": data_inputs(ctx.source, kinds, cache),
        "models": {role: model_inputs(path, cache) for role, path in models.items() if path is not None},
        "code": code_inputs(lora),
    }
    return json.loads(json.dumps(inputs))  # as inputs.json holds it (tuples as lists), so the two compare


def judge_model(cfg) -> str | None:
    """The reward model an evaluation's judge loads, if any (its weights are an input too)."""
    if cfg.judge.get("name") == "reward_model" and cfg.judge.get("path") not in (None, "???"):
        return str(cfg.judge.path)
    return None


# --------------------------------------------------------------------------- compare, record


def _leaves(tree, prefix: tuple = ()) -> dict[tuple, object]:
    if isinstance(tree, dict) and tree:
        out = {}
        for key, value in tree.items():
            out.update(_leaves(value, (*prefix, str(key))))
        return out
    return {prefix: tree}


def _describe(path: tuple, old, new) -> str:
    """One change in words: ``data.path: demos.jsonl changed``, ``torch 2.4.0 -> 2.5.0``."""
    if path[0] == "code":
        return f"{path[-1]} {old if old is not None else '(none)'} -> {new if new is not None else '(none)'}"
    if path[0] == "models" and len(path) > 1:
        state = "changed" if old is not None and new is not None else "added or removed"
        return f"{path[1]} model: {'/'.join(path[2:])} {state}"
    if path[0] == "data" and len(path) > 2 and path[2] in ("path", "heldout_path"):
        name = "/".join(path[3:]) or "files"
        state = "changed" if old is not None and new is not None else ("added" if old is None else "removed")
        return f"{path[1]}.{path[2]}: {name} {state}"
    return f"{'.'.join(path)}: {old!r} -> {new!r}"


def changes(old: dict, new: dict) -> list[str]:
    """What differs between two input records, in words, in a stable order."""
    before, after = _leaves(old), _leaves(new)
    return [_describe(path, before.get(path), after.get(path))
            for path in sorted(set(before) | set(after)) if before.get(path) != after.get(path)]


def read_inputs(folder: Path) -> dict | None:
    try:
        record = json.loads((Path(folder) / INPUTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def refuse_if_changed(folder: Path, current: dict, what: str, run_dir: Path, finished: bool) -> None:
    """Raise StaleRunError when the inputs recorded in `folder` differ from `current`.

    `finished`: the unit is done (it would be skipped); otherwise it has a saved state to resume.
    A unit with no record (written by an ibridge that did not keep one) cannot be trusted either.
    """
    recorded = read_inputs(folder)
    if recorded is not None and recorded == current:
        return
    state = "finished earlier" if finished else "was stopped part-way"
    if recorded is None:
        why = "by an ibridge that did not record its inputs, so whether they changed is unknown"
    else:
        found = changes(recorded, current)
        shown = "; ".join(found[:3]) + (f"; and {len(found) - 3} more" if len(found) > 3 else "")
        why = f"from other inputs ({shown})"
    action = "skipped" if finished else "resumed"
    raise StaleRunError(
        f"{what} in {folder} {state} {why}; it is not {action}: rerun with resume=false to start over "
        f"(the earlier run is kept as {Path(run_dir).name}.bak-<time>), or delete {folder} to run only it again"
    )


def record_inputs(folder: Path, inputs: dict) -> None:
    write_json_atomic(Path(folder) / INPUTS_FILE, inputs)


def has_unresolved(inputs: dict) -> bool:
    """Whether a model or hub dataset could not be fingerprinted yet (not downloaded): record
    the inputs again once the unit has loaded them."""
    models = inputs.get("models", {}).values()
    hubs = [record.get("hub") for record in inputs.get("data", {}).values() if isinstance(record, dict)]
    return any(m.get("weights") is None for m in models) or any(h and h.get("revision") is None for h in hubs)


class StageGuard:
    """The inputs check of one stage or evaluation folder (see the module docstring).

    Every rank computes and compares (each reads the same files), so that all of them stop
    together on a stale folder; rank 0 alone records.
    """

    def __init__(self, ctx, folder: Path, what: str, kinds: tuple[str, ...], models: dict):
        self.ctx, self.folder, self.what, self.kinds, self.models = ctx, Path(folder), what, kinds, models
        self._current: dict | None = None

    def current(self) -> dict:
        if self._current is None:
            self._current = unit_inputs(self.ctx, self.kinds, self.models)
        return self._current

    def refuse_if_changed(self, finished: bool) -> None:
        """Before skipping a finished unit (`finished`) or resuming a saved state: the same inputs or StaleRunError."""
        from ibridge.checkpointing import has_state

        if finished or has_state(self.folder / "state"):
            refuse_if_changed(self.folder, self.current(), self.what, self.ctx.run_dir, finished)

    def record(self) -> None:
        """Keep the inputs in the folder (rank 0), once the unit has loaded its data and models:
        a hub model or dataset downloaded meanwhile is fingerprinted too."""
        if has_unresolved(self.current()):
            self._current = None
        if self.ctx.runtime.dist.is_main:
            record_inputs(self.folder, self.current())
