"""Batches: right padding, -100 label masking, and concatenated chosen/rejected."""

from __future__ import annotations

import torch

from ibridge.data.formatting import IGNORE_INDEX


def _as_list(ids) -> list:
    return ids.tolist() if hasattr(ids, "tolist") else ids


def pad_sequences(items: list[dict], pad_id: int, ref_key: str | None = None) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids``/``labels`` (and cached reference log-probs) to one length.

    Reference log-probs are per shifted position (length ``len(input_ids) - 1``),
    padded with 0.0 where the mask is off.
    """
    lengths = [len(item["input_ids"]) for item in items]
    length = max(lengths)
    # One tensor constructor per field from right-padded lists: a few times faster than
    # filling a preallocated tensor row by row (collation runs once per micro-batch).
    input_ids = torch.tensor(
        [[*_as_list(item["input_ids"]), *[pad_id] * (length - n)] for item, n in zip(items, lengths, strict=True)],
        dtype=torch.long,
    )  # (B, T)
    labels = torch.tensor(
        [[*_as_list(item["labels"]), *[IGNORE_INDEX] * (length - n)] for item, n in zip(items, lengths, strict=True)],
        dtype=torch.long,
    )  # (B, T)
    attention = (torch.arange(length) < torch.tensor(lengths).unsqueeze(1)).long()  # (B, T)
    ref = None
    if ref_key:  # one value per shifted position: (n - 1,) for a sequence of n tokens
        rows = [torch.as_tensor(item[ref_key], dtype=torch.float32) for item in items]
        if any(len(row) != n - 1 for row, n in zip(rows, lengths, strict=True)):
            raise ValueError(f"{ref_key}: expected len(input_ids) - 1 values per sequence")
        ref = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (B, T-1), 0.0 past each sequence
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
