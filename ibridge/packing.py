"""Padding-free packing of right-padded micro-batches for the training forward pass.

A batch of sequences of uneven length wastes the positions its padding fills (about
38% of a DPO forward on the toy data, BENCHMARKS.md). Packing places the sequences
end to end in fewer, longer rows; a block-diagonal causal mask and per-sequence
position ids make every real token's logits those of the padded forward, so the
objectives (DESIGN.md §2), which only read real tokens, see the same loss and
gradients up to float rounding. The batches themselves are unchanged, unlike
length-grouped batching, which re-weights the data (rejected in BENCHMARKS.md).
"""

from __future__ import annotations

import torch

from ibridge.runtime import Runtime

# Padding-free packing. Rows hold up to PACK_FACTOR x the batch's padded length: on the
# toy model (eager attention, CPU) 1.5-2x left the least work per token (DPO pairs:
# 38% padding -> about 6%). Packing that would save under PACK_MIN_SAVING of the positions
# is skipped (a batch of equal lengths runs as it is).
PACK_FACTOR = 1.5
PACK_MIN_SAVING = 0.05
# Model families whose forward takes a 4D additive attention mask and `position_ids` as
# given (transformers' Llama-style attention), with eager attention only: sdpa and flash
# kernels on GPUs have padding-free paths of their own.
PACKABLE_MODEL_TYPES = frozenset({"llama"})


def packing_supported(model: torch.nn.Module, runtime: Runtime) -> bool:
    config = getattr(model, "config", None)
    return runtime.attn_implementation == "eager" and getattr(config, "model_type", None) in PACKABLE_MODEL_TYPES


def pack_plan(attention_mask: torch.Tensor, factor: float = PACK_FACTOR):
    """Where each token of a right-padded batch goes when its sequences are packed into rows.

    attention_mask (B, T), right padding. Sequences are placed first-fit-decreasing into
    rows of at most ``max(T, factor * T)`` tokens. Returns None when the batch is not
    right-padded or packing would save little; else a dict with ``rows`` R, ``width`` L,
    ``dst`` (B, T): each padded position's index in the flattened (R * L) packed layout
    (0 for padding), ``valid`` (B, T) bool, ``positions`` and ``segments`` (R, L): the
    position of each packed token within its sequence and the sequence's row in the
    batch (-1 for the packed rows' own padding).
    """
    batch, width = attention_mask.shape
    device = attention_mask.device
    valid = attention_mask.bool()
    lengths_t = valid.sum(1)
    steps = torch.arange(width, device=device)
    if not torch.equal(valid, steps < lengths_t.unsqueeze(1)):
        return None  # not right-padded
    lengths = lengths_t.tolist()
    cap = max(width, int(factor * width))
    used: list[int] = []
    row_of = [0] * batch
    offset = [0] * batch
    for i in sorted(range(batch), key=lengths.__getitem__, reverse=True):
        n = lengths[i]
        row = next((r for r, u in enumerate(used) if u + n <= cap), len(used))
        if row == len(used):
            used.append(0)
        row_of[i], offset[i] = row, used[row]
        used[row] += n
    rows, packed_width = len(used), max(used)
    if rows * packed_width > (1.0 - PACK_MIN_SAVING) * batch * width:
        return None
    start = torch.tensor(row_of, device=device) * packed_width + torch.tensor(offset, device=device)  # (B,)
    dst = (start.unsqueeze(1) + steps).masked_fill_(~valid, 0)  # (B, T)
    flat = dst[valid]  # (N,)
    positions = torch.zeros(rows * packed_width, dtype=torch.long, device=device)
    positions[flat] = steps.expand(batch, width)[valid]
    segments = torch.full((rows * packed_width,), -1, dtype=torch.long, device=device)
    segments[flat] = torch.arange(batch, device=device).unsqueeze(1).expand(batch, width)[valid]
    return {"rows": rows, "width": packed_width, "dst": dst, "valid": valid,
            "positions": positions.view(rows, packed_width), "segments": segments.view(rows, packed_width)}


class PackedForward:
    """Calls `model` on a right-padded batch packed without its padding; logits come back padded.

    Each sequence keeps its own positions (0, 1, ...) and attends only to itself (a
    block-diagonal causal mask), so the logits at every real token, hence the loss and
    the gradients, are those of the padded forward up to float rounding; the padded
    positions, which every objective masks out, get arbitrary logits. A call with
    `labels`, `position_ids` or a cache, and a batch `pack_plan` declines, run unpacked.
    """

    def __init__(self, model, factor: float = PACK_FACTOR):
        self.model = model
        self.factor = factor

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, input_ids=None, attention_mask=None, **kwargs):
        plan = None
        if input_ids is not None and attention_mask is not None and attention_mask.dim() == 2 \
                and not {"position_ids", "labels", "past_key_values"} & kwargs.keys():
            plan = pack_plan(attention_mask, self.factor)
        if plan is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        rows, width, dst, valid = plan["rows"], plan["width"], plan["dst"], plan["valid"]
        packed = torch.zeros(rows * width, dtype=input_ids.dtype, device=input_ids.device)
        packed[dst[valid]] = input_ids[valid]
        segments = plan["segments"]
        allowed = (segments.unsqueeze(2) == segments.unsqueeze(1)) & torch.ones(
            width, width, dtype=torch.bool, device=input_ids.device).tril()  # (R, L, L)
        mask = torch.zeros(rows, 1, width, width, device=input_ids.device)
        mask.masked_fill_(~allowed.unsqueeze(1), torch.finfo(mask.dtype).min)  # (R, 1, L, L) additive
        out = self.model(input_ids=packed.view(rows, width), attention_mask=mask, position_ids=plan["positions"],
                         **kwargs)
        logits = out.logits  # (R, L, V)
        out.logits = logits.reshape(rows * width, -1)[dst.view(-1)].view(*input_ids.shape, -1)  # (B, T, V)
        return out
