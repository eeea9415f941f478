"""Data sources, chat formatting and collation (docs/design.md §4, "ibridge/data/").

A *source* supplies examples of some of these kinds:

- ``demonstrations``: ``{"prompt": str | messages, "response": str}``, plus the whole
  conversation as ``"messages"`` when several assistant turns are trained on
- ``heldout_demonstrations``: demonstrations kept out of training (``kl/token``)
- ``preferences``: ``{"prompt", "chosen", "rejected"}`` (chosen/rejected: the final assistant reply)
- ``heldout_pairs``: preference pairs kept out of training (implicit-reward accuracy)
- ``eval``: ``{"prompt", "reference"}``: evaluation prompts with fixed reference outputs

Sources: ``toy`` (the synthetic world), ``jsonl``/``local`` (local JSONL, JSON or
Parquet files), ``ultrachat`` and ``ultrafeedback`` (hub datasets, or a local copy
at ``data.path``). A data config may add ``demonstrations_from``,
``preferences_from`` or ``eval_from``: another data config supplying those kinds.
"""

from __future__ import annotations

from collections.abc import Mapping

from ibridge.data.schema import DataError
from ibridge.data.sources import (
    FROM_KEYS,
    CompositeSource,
    JsonlSource,
    LocalSource,
    ToySource,
    UltraChatSource,
    UltraFeedbackSource,
    _plain,
)

SOURCES = {
    "toy": ToySource,
    "jsonl": LocalSource,
    "local": LocalSource,
    "ultrachat": UltraChatSource,
    "ultrafeedback": UltraFeedbackSource,
}

__all__ = ["SOURCES", "DataError", "JsonlSource", "source_for"]


def source_for(data_cfg: Mapping, key: str = "data"):
    """The data source a `data` config names (with its ``*_from`` sources, if any)."""
    cfg = _plain(data_cfg)
    kind = cfg.get("kind")
    if kind not in SOURCES:
        raise DataError(f"{key}.kind={kind!r}: expected one of {', '.join(sorted(SOURCES))}")
    primary = SOURCES[kind](cfg, key=key)
    others = {name: source_for(cfg[name], f"{key}.{name}") for name in FROM_KEYS if cfg.get(name)}
    return CompositeSource(primary, others) if others else primary
