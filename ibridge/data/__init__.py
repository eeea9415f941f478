"""Data sources, chat formatting and collation (DESIGN.md §4, "ibridge/data/").

A *source* supplies examples of some of these kinds:

- ``demonstrations``: ``{"prompt": str | messages, "response": str}``
- ``preferences``: ``{"prompt", "chosen", "rejected"}``
- ``heldout_pairs``: preference pairs kept out of training (implicit-reward accuracy)
- ``eval``: ``{"prompt", "reference"}``: evaluation prompts with fixed reference outputs
"""

from __future__ import annotations

from collections.abc import Mapping

from ibridge.data.sources import JsonlSource, ToySource

SOURCES = {"toy": ToySource, "jsonl": JsonlSource}


def source_for(data_cfg: Mapping):
    """The data source a `data` config names."""
    kind = data_cfg["kind"]
    if kind not in SOURCES:
        raise ValueError(f"data.kind={kind!r}: expected one of {', '.join(sorted(SOURCES))}")
    return SOURCES[kind](data_cfg)
