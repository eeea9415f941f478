"""A LoRA stage's adapters, saved beside its merged checkpoint (docs/design.md §4).

The stage's ``checkpoint/`` holds the merged model (the next stage's reference, ibridge/lora.py);
``adapter/`` holds the adapters alone in peft's format (``adapter_config.json``,
``adapter_model.safetensors``), for ``PeftModel.from_pretrained(<base>, <stage>/adapter)``.
The folder appears only once complete (written to a staging folder, then renamed).
"""

from __future__ import annotations

from pathlib import Path

from ibridge.io import publish_dir, staging_dir

ADAPTER_DIR = "adapter"


def save_adapter(model, final_dir: Path) -> Path:
    """Write `model`'s (a peft model's) adapters to `final_dir`, safetensors only."""
    tmp = staging_dir(final_dir)
    model.save_pretrained(str(tmp), safe_serialization=True)
    publish_dir(tmp, final_dir)
    return Path(final_dir)
