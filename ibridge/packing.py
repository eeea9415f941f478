"""The training forward: padding-free packing, and log-probs at scored tokens only.

Packing. A batch of sequences of uneven length wastes the positions its padding fills
(about 38% of a DPO forward on the toy data, BENCHMARKS.md; more with long-tailed
conversations). Packing places the sequences end to end in fewer rows, each with its own
position ids (0, 1, ...). Given position ids and no attention mask, transformers finds the
sequence boundaries itself (``masking_utils.find_packed_sequence_indices``) and keeps each
sequence to itself on every attention path:

* ``eager`` and ``sdpa``: a block-diagonal causal mask per row. Attention is dense within
  a row, so sequences go first-fit-decreasing into several rows of at most PACK_FACTOR x
  the batch's padded length (layout ``rows``).
* ``flash_attention_2`` / ``_3``: variable-length kernels from the position ids, which
  transformers reads only from a single row; ``flex_attention``: a document BlockMask that
  skips the other sequences' blocks. Every sequence goes into one row (layout ``row``).

Other attention implementations and model families cannot pack: the loop says so once in
the log and runs them padded. The logits at every real token, hence the loss and the
gradients, are those of the padded forward up to float rounding (tests/test_packing.py);
the batches are unchanged, unlike length-grouped batching, which re-weights the data
(rejected in BENCHMARKS.md).

Scored tokens only. The objectives (docs/design.md §2) read ``log pi`` at response tokens
alone, so `scored_logps` asks the model for logits at those positions only
(``logits_to_keep`` as a mask), and where the logits of a micro-batch would exceed
FUSED_HEAD_BYTES, it takes the final hidden states and applies the head in chunks
without ever holding the logits (ibridge/lmhead.py; docs/memory.md).
"""

from __future__ import annotations

import logging
import sys

import torch

from ibridge.lmhead import linear_label_logps, plain_head
from ibridge.objectives.logprobs import label_logps, token_logps
from ibridge.runtime import Runtime

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Rows hold up to PACK_FACTOR x the batch's padded length (layout "rows"): on the toy model
# (eager attention, CPU) 1.5-2x left the least work per token (DPO pairs: 38% padding ->
# about 6%). Packing that would save under PACK_MIN_SAVING of the positions is skipped (a
# batch of equal lengths runs as it is).
PACK_FACTOR = 1.5
PACK_MIN_SAVING = 0.05
# Attention implementation -> how packed sequences are laid out (module docstring).
PACKING_LAYOUTS = {"eager": "rows", "sdpa": "rows", "flash_attention_2": "row", "flash_attention_3": "row",
                   "flex_attention": "row"}
# Model families whose masks transformers builds from packed position ids (create_causal_mask),
# checked packed against padded in tests/test_packing.py.
PACKABLE_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})
# Micro-batches whose float32 logits at scored tokens would exceed this run the chunked head
# of ibridge/lmhead.py (one more head matmul, no logits held); smaller ones keep the logits,
# which is faster. 256 MiB: never on the toy model, always at a 128k vocabulary and a few
# hundred scored tokens (docs/memory.md).
FUSED_HEAD_BYTES = 256 * 2**20

_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.warning(message)


def packing_layout(model: torch.nn.Module) -> str | None:
    """``rows``, ``row`` or None (this model and attention implementation cannot pack; logged once)."""
    config = getattr(model, "config", None)
    if config is None:
        return None  # not a transformers model (a test's toy module): nothing to pack, nothing to say
    model_type = getattr(config, "model_type", None)
    attn = getattr(config, "_attn_implementation", None)
    layout = PACKING_LAYOUTS.get(attn)
    if model_type not in PACKABLE_MODEL_TYPES:
        _say_once(f"padding-free packing: not checked for model type {model_type!r} (packable: "
                  f"{', '.join(sorted(PACKABLE_MODEL_TYPES))}); micro-batches run padded")
        return None
    if layout is None:
        _say_once(f"padding-free packing: attention implementation {attn!r} takes no packed sequences "
                  f"(packable: {', '.join(PACKING_LAYOUTS)}); micro-batches run padded")
    return layout


def packing_supported(model: torch.nn.Module, runtime: Runtime | None = None) -> bool:
    return packing_layout(model) is not None


def takes_logits_mask(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` as a boolean (batch, seq) mask: its
    modeling code slices with transformers' ``slice_logits_to_keep`` (transformers 5), which
    flattens the kept positions to (S, H) before the head.

    The modeling class is the first class of the MRO that torch did not define: FSDP2's
    ``fully_shard`` swaps the model's class for a subclass defined in torch
    (``FSDPLlamaForCausalLM``, then ``FSDPModule``, then ``LlamaForCausalLM``), whose own module
    has no such function; reading only ``type(model)``, a sharded model computed logits at every
    position. (Not any class of the MRO: transformers' ``PreTrainedModel`` lives beside the
    function in every version that has it, modeling code that uses it or not.)"""
    base = getattr(model, "module", model)  # DDP, DeepSpeed
    if hasattr(base, "get_base_model"):  # peft
        base = base.get_base_model()
    modeling = next((cls for cls in type(base).__mro__ if not cls.__module__.startswith("torch.")), type(base))
    return getattr(sys.modules.get(modeling.__module__), "slice_logits_to_keep", None) is not None


def pack_plan(attention_mask: torch.Tensor, factor: float = PACK_FACTOR, layout: str = "rows"):
    """Where each token of a right-padded batch goes when its sequences are packed.

    attention_mask (B, T), right padding. Layout ``rows``: sequences first-fit-decreasing
    into rows of at most ``max(T, factor * T)`` tokens; layout ``row``: all in one row.
    Returns None when the batch is not right-padded or packing would save little; else a
    dict with ``rows`` R, ``width`` L, ``dst`` (B, T): each padded position's index in the
    flattened (R * L) packed layout (0 for padding), ``valid`` (B, T) bool, ``positions``
    and ``segments`` (R, L): the position of each packed token within its sequence and the
    sequence's row in the batch (-1 for the packed rows' own padding, whose positions count
    from 0 again so that they form sequences of their own).
    """
    batch, width = attention_mask.shape
    device = attention_mask.device
    valid = attention_mask.bool()
    lengths_t = valid.sum(1)
    steps = torch.arange(width, device=device)
    if not torch.equal(valid, steps < lengths_t.unsqueeze(1)):
        return None  # not right-padded
    lengths = lengths_t.tolist()
    cap = sum(lengths) if layout == "row" else max(width, int(factor * width))
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
    filled = torch.zeros(rows * packed_width, dtype=torch.bool, device=device)
    filled[flat] = True
    # Row padding counts 0, 1, ... from its own start: a sequence of its own, never the tail of a real one.
    tail = (~filled).view(rows, packed_width).long()
    positions = (tail.cumsum(1) - 1).clamp_(min=0).view(-1)
    positions[flat] = steps.expand(batch, width)[valid]
    segments = torch.full((rows * packed_width,), -1, dtype=torch.long, device=device)
    segments[flat] = torch.arange(batch, device=device).unsqueeze(1).expand(batch, width)[valid]
    return {"rows": rows, "width": packed_width, "dst": dst, "valid": valid,
            "positions": positions.view(rows, packed_width), "segments": segments.view(rows, packed_width)}


class PackedForward:
    """The module the training loop calls: `model` with packed micro-batches and a scored-token head.

    Whether and how it packs follows the model's attention implementation (`packing_layout`;
    ``pack=False``: never). ``fused_head``: the chunked head of ibridge/lmhead.py may run
    outside the model's forward (one process or DDP, a plain ``nn.Linear`` head). Calling it
    like the model returns logits in the padded layout (objectives that need whole logits:
    pretraining); `scored_logps` returns the log-probs the objectives need, without logits at
    unscored positions. A call with `labels`, `position_ids` or a cache, or a batch
    `pack_plan` declines, runs unpacked.
    """

    def __init__(self, model, pack: bool = True, factor: float = PACK_FACTOR, fused_head: bool = False):
        self.model = model
        base = getattr(model, "module", model)  # DDP's module
        self.layout = packing_layout(base) if pack else None
        # Eager attention gets the block-diagonal mask as an explicit additive 4D mask, which
        # it takes with or without a cache (the toy base's pretraining has used exactly this
        # since packing came in; the same floats keep the cached base reproducible). The
        # other paths build their mask from the position ids, which transformers reads only
        # without a cache.
        self.explicit_mask = getattr(getattr(base, "config", None), "_attn_implementation", None) == "eager"
        self.factor = factor
        # Logits at scored tokens only, through the model's own head; the chunked head reads the
        # decoder's last (normed) hidden states instead (`final_hidden_states`).
        self.logits_mask = takes_logits_mask(model)
        self.fused_head = fused_head and self.logits_mask

    def __getattr__(self, name):
        return getattr(self.model, name)

    def _plan(self, input_ids, attention_mask):
        if self.layout is None or input_ids is None or attention_mask is None or attention_mask.dim() != 2:
            return None
        return pack_plan(attention_mask, self.factor, self.layout)

    def _packed_inputs(self, plan, input_ids) -> dict:
        """input_ids (R, L) and the position ids, plus the mask or use_cache=False (above)."""
        rows, width, valid = plan["rows"], plan["width"], plan["valid"]
        packed = torch.zeros(rows * width, dtype=input_ids.dtype, device=input_ids.device)
        packed[plan["dst"][valid]] = input_ids[valid]
        inputs = {"input_ids": packed.view(rows, width), "position_ids": plan["positions"]}
        if not self.explicit_mask:
            inputs["use_cache"] = False
            return inputs
        segments = plan["segments"]
        allowed = (segments.unsqueeze(2) == segments.unsqueeze(1)) & torch.ones(
            width, width, dtype=torch.bool, device=input_ids.device).tril()  # (R, L, L)
        mask = torch.zeros(rows, 1, width, width, device=input_ids.device)
        inputs["attention_mask"] = mask.masked_fill_(~allowed.unsqueeze(1), torch.finfo(mask.dtype).min)  # additive
        return inputs

    def __call__(self, *args, **kwargs):
        plan = None
        if not args and not {"position_ids", "labels", "past_key_values", "cache"} & kwargs.keys():
            plan = self._plan(kwargs.get("input_ids"), kwargs.get("attention_mask"))
        if plan is None:  # the call exactly as given
            return self.model(*args, **kwargs)
        input_ids = kwargs.pop("input_ids")
        kwargs.pop("attention_mask")
        out = self.model(**{**kwargs, **self._packed_inputs(plan, input_ids)})
        logits = out.logits  # (R, L, V)
        dst = plan["dst"]
        out.logits = logits.reshape(plan["rows"] * plan["width"], -1)[dst.view(-1)].view(*input_ids.shape, -1)
        return out  # logits (B, T, V)

    def scored_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        """``token_logps(model(input_ids, attention_mask).logits, labels)``, computed at scored tokens only.

        input_ids, attention_mask, labels (B, T), right padding. Returns logps (B, T-1)
        float32 (0.0 where unscored) and the mask (B, T-1) bool.
        """
        batch, width = input_ids.shape
        targets = torch.cat([labels[:, 1:], labels.new_full((batch, 1), IGNORE_INDEX)], dim=1)  # (B, T): next token
        scored = targets != IGNORE_INDEX  # (B, T)
        plan = self._plan(input_ids, attention_mask)
        if plan is None:
            ids, inputs, keep, flat_targets = input_ids, {"attention_mask": attention_mask}, scored, targets
        else:
            rows, packed_width, dst, valid = plan["rows"], plan["width"], plan["dst"], plan["valid"]
            inputs = self._packed_inputs(plan, input_ids)
            ids = inputs.pop("input_ids")
            keep = torch.zeros(rows * packed_width, dtype=torch.bool, device=ids.device)
            keep[dst[scored]] = True
            keep = keep.view(rows, packed_width)  # (R, L)
            flat_targets = torch.zeros(rows * packed_width, dtype=targets.dtype, device=ids.device)
            flat_targets[dst[valid]] = targets[valid]
        picked = flat_targets.reshape(-1)[keep.reshape(-1)]  # (S,) in row-major order of `ids`
        head = plain_head(self.model) if self.fused_head else None
        vocab = head.weight.shape[0] if head is not None else 0
        if head is not None and picked.numel() * vocab * 4 > FUSED_HEAD_BYTES:
            hidden = final_hidden_states(self.model, ids, {"use_cache": False, **inputs})[keep]  # (S, H)
            values = linear_label_logps(hidden, head.weight, head.bias, picked)  # (S,)
        elif self.logits_mask:
            logits = self.model(input_ids=ids, **{"use_cache": False, **inputs}, logits_to_keep=keep).logits  # (S, V)
            values = label_logps(logits, picked)  # (S,)
        else:
            logits = self.model(input_ids=ids, **{"use_cache": False, **inputs}).logits  # (rows, width, V)
            values = label_logps(logits[keep], picked)
        flat = torch.zeros(keep.numel(), dtype=values.dtype, device=values.device).masked_scatter(
            keep.reshape(-1), values)  # (rows * width,) in the layout of `ids`
        logps = flat.view(batch, width) if plan is None else flat[plan["dst"]].masked_fill(~scored, 0.0)  # (B, T)
        return logps[:, :-1], scored[:, :-1]


def final_hidden_states(model, input_ids: torch.Tensor, inputs: dict) -> torch.Tensor:
    """The decoder's last hidden states (rows, width, H), after its final norm: what the head reads.

    Caught on the decoder's output (``get_decoder()``) by a forward hook, with the head run at
    one position per row (``logits_to_keep=1``). ``output_hidden_states=True`` would return the
    same tensor but keep every layer's output too, L + 1 tensors of T x H: dead weight in a
    no-grad pass (the reference pass, evaluation), where nothing else holds them; at 8B
    (32 layers, an 8,192-token batch, bf16) 2.2 GB, as much as the logits the chunked head avoids.
    """
    base = getattr(model, "module", model)  # DDP's module
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base:
        return model(input_ids=input_ids, **inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    caught = []

    def catch(module, args, output):
        caught.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = decoder.register_forward_hook(catch)
    try:
        model(input_ids=input_ids, **inputs, logits_to_keep=1)
    finally:
        handle.remove()
    return caught[-1]


def training_forward(trained, model, runtime: Runtime, pack: bool = True) -> PackedForward:
    """What the loop calls: `trained` (the model, or DDP around it) packed where `model` can pack,
    with the chunked head where it may run outside the forward (not under FSDP or DeepSpeed,
    whose parameters are sharded or wrapped outside the model's own forward)."""
    fused = runtime.dist.mode in ("none", "ddp") and plain_head(model) is not None
    return PackedForward(trained, pack, fused_head=fused)


def scored_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps (B, T-1), mask (B, T-1)) of a right-padded batch's labelled tokens under `model`:
    through `PackedForward.scored_logps` in the training loop, else from the model's logits."""
    if isinstance(model, PackedForward):
        return model.scored_logps(batch["input_ids"], batch["attention_mask"], batch["labels"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return token_logps(logits, batch["labels"])  # (B, T-1)
