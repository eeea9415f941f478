"""Flash attention's dtype behaviour on a CPU, for tests; not a test module.

`register()` adds an attention implementation to transformers' AttentionInterface that does
what ``flash_attention_2`` does to dtypes on a GPU: transformers' own flash-attention dtype
logic (``get_target_dtype``: an fp32 query is cast to the autocast dtype, else to the dtype of
the model's linear weights; ``fa_peft_integration_check`` casts q, k, v), then flash-attn's
check (its kernels refuse anything but fp16 and bf16 with "FlashAttention only support fp16
and bf16 data type"), then attention computed by sdpa. Its name has no "flash" in it
(transformers would try to import flash-attn's kernels for such a name), so tests tell ibridge
it is half-precision only through `ibridge.scoring.HALF_PRECISION_ATTENTION`.
"""

from __future__ import annotations

import torch

NAME = "simulated_fa2"
CALLS: list[torch.dtype] = []  # the dtype each call ran attention in


def attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.flash_attention import get_target_dtype
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_flash_attention_utils import fa_peft_integration_check

    query, key, value = fa_peft_integration_check(query, key, value, get_target_dtype(query, module))
    if query.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
    CALLS.append(query.dtype)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register(monkeypatch) -> str:
    """Register the simulated kernel (and sdpa's masks for it) and mark it half-precision only."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    try:
        import ibridge.scoring as scoring
    except ImportError:  # a checkout from before ibridge/scoring.py (the tests must fail there, not here)
        return NAME
    monkeypatch.setattr(scoring, "HALF_PRECISION_ATTENTION", (*scoring.HALF_PRECISION_ATTENTION, NAME))
    return NAME
