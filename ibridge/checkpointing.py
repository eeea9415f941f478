"""Resumable training state: model, optimiser, scheduler and position, without pickle.

A state folder holds ``model.safetensors`` (every weight of the module being trained,
LoRA-wrapped or not, via ``safetensors.torch.save_model``),
``optimizer.safetensors`` (every tensor of the optimiser state) and
``trainer_state.json`` (step, scheduler state, optimiser hyper-parameters, the
metrics-file bookmark). It is written to a staging folder and renamed into place,
so a state folder that exists is complete: a kill at any moment leaves the previous
state or the new one, never half of one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ibridge.io import publish_dir, staging_dir

STATE_FILE = "trainer_state.json"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_state(final_dir: Path, model, optimizer, scheduler, step: int, extra: dict) -> None:
    from safetensors.torch import save_model

    tmp = staging_dir(final_dir)
    save_model(model, str(tmp / "model.safetensors"))
    tensors, meta = _optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    payload = {"step": step, "optimizer": meta, "scheduler": scheduler.state_dict(), **extra}
    (tmp / STATE_FILE).write_text(json.dumps(payload))
    publish_dir(tmp, final_dir)


def load_state(state_dir: Path, model, optimizer, scheduler) -> dict:
    """Restore a state saved by `save_state` into live objects; returns its JSON payload."""
    from safetensors.torch import load_model

    state_dir = Path(state_dir)
    payload = json.loads((state_dir / STATE_FILE).read_text())
    load_model(model, str(state_dir / "model.safetensors"), device=str(next(model.parameters()).device))
    tensors = load_file(str(state_dir / "optimizer.safetensors"))
    per_param: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        per_param.setdefault(int(index), {})[key] = value
    for index, values in payload["optimizer"]["scalars"].items():
        per_param.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": per_param, "param_groups": payload["optimizer"]["param_groups"]})
    scheduler.load_state_dict(payload["scheduler"])
    return payload


def has_state(state_dir: Path) -> bool:
    return (Path(state_dir) / STATE_FILE).is_file()
