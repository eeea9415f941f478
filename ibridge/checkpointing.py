"""Resumable training state: model, optimiser, scheduler and position, without pickle.

A state folder holds ``model.safetensors`` (every weight of the module being trained,
LoRA-wrapped or not, via ``safetensors.torch.save_model``),
``optimizer.safetensors`` (every tensor of the optimiser state) and
``trainer_state.json`` (step, scheduler state, optimiser hyper-parameters, the
metrics-file bookmark). It is written to a staging folder and renamed into place,
so a state folder that exists is complete: a kill at any moment leaves the previous
state or the new one, never half of one.

Under FSDP (``sharded=True``) the model and optimiser state are gathered to full
tensors keyed by parameter name (torch.distributed.checkpoint's full state dict)
and written by rank 0 in the same files; on resume rank 0 alone reads them and
broadcasts them a tensor at a time, each rank keeping its own shard
(``StateDictOptions(broadcast_from_rank0=True)``): the full state (12 bytes a parameter,
96 GB at 8B) sits in rank 0's host memory only, not in every rank's. The format is the
same whatever the number of ranks, so a state saved by 8 ranks resumes on 4.

Under torchrun every rank calls :func:`save_state` and returns only once rank 0 has
published the state: the others wait in one barrier right after the write, bounded by
the process group's timeout (``trainer.dist_timeout_min``, default 60 min), rather than
in whatever collective comes next (a rank stopping on SIGTERM would otherwise exit, and
torchrun could stop rank 0, before the state it stopped for was written). Rank 0 logs how
long the write took and warns when it took over half of that timeout.
(torch.distributed.checkpoint's own format, each rank writing its shard, was not used: its
metadata is a pickle, which ibridge does not load.)
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ibridge.distributed import DistInfo, barrier
from ibridge.io import publish_dir, staging_dir

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


def _optimizer_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser state dict (keyed by parameter index, or by name under FSDP)
    into tensors for safetensors and JSON-able scalars."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _gathered_states(model, optimizer) -> tuple[dict, dict]:
    """Full model and optimiser state dicts of an FSDP-sharded model (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_state(final_dir: Path, model, optimizer, scheduler, step: int, extra: dict, *,
               sharded: bool = False, write: bool = True, info: DistInfo | None = None) -> None:
    """Write the state (`write`: rank 0). Under FSDP every rank must call it (`sharded`: the
    state is gathered); with `info` of several ranks every rank must call it, and all return
    once the state is published."""
    if sharded:
        model_state, optimizer_state = _gathered_states(model, optimizer)
    else:
        model_state, optimizer_state = None, None
    if write:
        started = time.perf_counter()
        _write_state(final_dir, model, optimizer, scheduler, step, extra, model_state, optimizer_state)
        seconds = time.perf_counter() - started
        log.info("resumable state at step %d written in %.1f s (%s)", step, seconds, final_dir)
        if info is not None and info.enabled and seconds > 30 * info.timeout_min:
            log.warning("writing the resumable state took %.0f s, over half of trainer.dist_timeout_min=%g min "
                        "that the other ranks wait: raise it, or save less often", seconds, info.timeout_min)
    if info is not None:
        barrier(info)  # the others wait here, not in the next step's collective


def _write_state(final_dir, model, optimizer, scheduler, step, extra, model_state, optimizer_state) -> None:
    from safetensors.torch import save_model

    sharded = model_state is not None
    tmp = staging_dir(final_dir)
    if sharded:
        save_file(_unshared(model_state), str(tmp / "model.safetensors"))
    else:
        save_model(model, str(tmp / "model.safetensors"))
        optimizer_state = optimizer.state_dict()
    tensors, meta = _optimizer_tensors(optimizer_state)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    payload = {"step": step, "optimizer": meta, "scheduler": scheduler.state_dict(), **extra}
    (tmp / STATE_FILE).write_text(json.dumps(payload))
    publish_dir(tmp, final_dir)


def _unshared(state: dict) -> dict:
    """`state`'s tensors made contiguous, each copied if an earlier one shares its memory:
    safetensors refuses shared memory, which tied weights (lm_head = embed_tokens) have in the
    gathered state where the gather returns the local tensor itself (FSDP on one CPU rank).
    Every name keeps its own copy, as the gather on several ranks gives."""
    out, seen = {}, set()
    for name, value in state.items():
        value = value.contiguous()
        storage = value.untyped_storage().data_ptr()
        out[name] = value.clone() if storage in seen else value
        seen.add(storage)
    return out


def _param_key(index: str) -> int | str:
    return int(index) if index.isdigit() else index  # an index, or a parameter name under FSDP


def _read_optimizer_state(state_dir: Path, payload: dict) -> dict:
    """The optimiser state dict of a state folder (its tensors and its JSON scalars)."""
    tensors = load_file(str(state_dir / "optimizer.safetensors"))
    per_param: dict[int | str, dict] = {}
    for name, value in tensors.items():
        index, key = name.rsplit(".", 1)  # state keys (exp_avg, step, ...) have no dots; names do
        per_param.setdefault(_param_key(index), {})[key] = value
    for index, values in payload["optimizer"]["scalars"].items():
        per_param.setdefault(_param_key(index), {}).update(values)
    return {"state": per_param, "param_groups": payload["optimizer"]["param_groups"]}


def load_state(state_dir: Path, model, optimizer, scheduler, *, sharded: bool = False) -> dict:
    """Restore a state saved by `save_state` into live objects; returns its JSON payload.

    Under FSDP (`sharded`) every rank must call it: rank 0 reads the files and broadcasts
    each tensor (and the optimiser's hyper-parameters), the others read only the JSON."""
    from safetensors.torch import load_model

    state_dir = Path(state_dir)
    payload = json.loads((state_dir / STATE_FILE).read_text())
    if sharded:
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        reader = dist.get_rank() == 0
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        # One call each: set_state_dict would take the others' empty model dict for "optimiser
        # only" and skip the model's broadcast that rank 0 enters.
        set_model_state_dict(model, load_file(str(state_dir / "model.safetensors")) if reader else {},
                             options=options)
        set_optimizer_state_dict(model, optimizer, _read_optimizer_state(state_dir, payload) if reader else {},
                                 options=options)
    else:
        load_model(model, str(state_dir / "model.safetensors"), device=str(next(model.parameters()).device))
        optimizer.load_state_dict(_read_optimizer_state(state_dir, payload))
    scheduler.load_state_dict(payload["scheduler"])
    return payload


def has_state(state_dir: Path) -> bool:
    return (Path(state_dir) / STATE_FILE).is_file()
