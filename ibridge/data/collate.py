"""Batches: right padding, -100 label masking, and concatenated chosen/rejected."""

from __future__ import annotations

import torch

from ibridge.data.formatting import IGNORE_INDEX


def pad_sequences(items: list[dict], pad_id: int, ref_key: str | None = None) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids``/``labels`` (and cached reference log-probs) to one length.

    Reference log-probs are per shifted position (length ``len(input_ids) - 1``),
    padded with 0.0 where the mask is off.
    """
    length = max(len(item["input_ids"]) for item in items)
    batch = len(items)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention = torch.zeros((batch, length), dtype=torch.long)  # (B, T)
    ref = torch.zeros((batch, length - 1), dtype=torch.float32) if ref_key else None  # (B, T-1)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.as_tensor(item["input_ids"])
        labels[row, :n] = torch.as_tensor(item["labels"])
        attention[row, :n] = 1
        if ref is not None:
            ref[row, : n - 1] = item[ref_key]
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
    if ref is not None:
        out["ref_logps"] = ref
    return out


def collate_demonstrations(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    has_ref = "ref_logps" in items[0]
    return pad_sequences(items, pad_id, "ref_logps" if has_ref else None)


def collate_pairs(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows, padded together: one forward for both."""
    sequences = [item["chosen"] for item in items] + [item["rejected"] for item in items]
    batch = pad_sequences(sequences, pad_id)
    if "ref_chosen" in items[0]:
        batch["ref_chosen"] = torch.tensor([item["ref_chosen"] for item in items], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([item["ref_rejected"] for item in items], dtype=torch.float32)
    return batch
