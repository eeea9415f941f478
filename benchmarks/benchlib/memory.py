"""The memory model of docs/memory.md, in code: what a step's peak should be, part by part.

All figures in MiB, fp32 training on one process (AdamW, foreach), a Llama-family model.
`training_peak` is the growth of the process's resident memory over what it held before
the model was loaded; `reference_pass_peak` the same for the DPO stage's reference pass.
benchmarks/bench_scale.py prints both beside the measured figures.
"""

from __future__ import annotations

from ibridge import lmhead
from ibridge.objectives import logprobs
from ibridge.packing import FUSED_HEAD_BYTES

MIB = 2**20
FLOAT = 4  # bytes, fp32
# Saved-for-backward floats per token per decoder layer, transformers' Llama in fp32 with sdpa
# attention: measured with torch.autograd.graph.saved_tensors_hooks at H = 128..512, I = 384..1536
# within 16% of 13 H + 5 I (docs/memory.md). Eager attention also keeps each row's attention
# probabilities: heads x row-width floats per token per layer.
ACT_PER_H, ACT_PER_I = 13, 5
ACT_NON_LAYER_PER_H = 2.5  # the embeddings' output and the final norm, per token
# Temporaries: the chunked head (ibridge/lmhead.py) holds about two (chunk, V) float32 tiles
# at once; label_logps (ibridge/objectives/logprobs.py) one chunk (logsumexp's) on float32
# logits, whose chunks are views. The budgets are ibridge's own, so the model follows the code.
HEAD_CHUNK_ELEMENTS = lmhead.CHUNK_ELEMENTS
LOGPROB_CHUNK_ELEMENTS = logprobs._CHUNK_ELEMENTS


def activations_mb(tokens: int, arch: dict, attn: str, row_width: int) -> float:
    """Saved activations of one micro-batch of `tokens` packed tokens."""
    hidden, inter, layers = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    per_layer = ACT_PER_H * hidden + ACT_PER_I * inter
    if attn == "eager":
        per_layer += arch["num_attention_heads"] * row_width
    return tokens * (layers * per_layer + ACT_NON_LAYER_PER_H * hidden) * FLOAT / MIB


def head_mb(scored: int, vocab: int, hidden: int, fused: bool) -> float:
    """The LM head's share at the start of the backward pass: its weight's gradient, plus either
    the chunked head's tiles or the logits at scored tokens and their gradient."""
    grad_weight = vocab * hidden * FLOAT / MIB
    if fused:
        return grad_weight + 2 * HEAD_CHUNK_ELEMENTS * FLOAT / MIB
    return grad_weight + 2 * scored * vocab * FLOAT / MIB + LOGPROB_CHUNK_ELEMENTS * FLOAT / MIB


def training_peak(parameters: int, vocab: int, arch: dict, attn: str, tokens: int, scored: int, row_width: int,
                  fused: bool = True) -> dict:
    """Peak growth of a training stage over the memory before the model: the larger of the backward
    pass's start (weights, AdamW moments, activations, head) and the optimiser step (weights,
    gradients, moments, one parameter-sized temporary of foreach AdamW)."""
    p = parameters * FLOAT / MIB
    backward = {"weights": p, "AdamW moments": 2 * p,
                "activations": activations_mb(tokens, arch, attn, row_width),
                "head": head_mb(scored, vocab, arch["hidden_size"], fused)}
    step = {"weights": p, "gradients": p, "AdamW moments": 2 * p, "AdamW temporary": p}
    which, parts = max((("backward", backward), ("optimiser step", step)), key=lambda kv: sum(kv[1].values()))
    return {"total_mb": sum(parts.values()), "phase": which, "parts": parts,
            "other_mb": sum((step if which == "backward" else backward).values())}


def reference_pass_peak(parameters: int, vocab: int, arch: dict, tokens: int, scored: int,
                        fused_head_bytes: int = FUSED_HEAD_BYTES) -> dict:
    """Peak growth of ibridge's reference pass (ibridge/refcache.py): the reference's weights, the
    decoder's last hidden states for its largest token-budget batch (`tokens` real tokens, packed;
    no gradients, so nothing else is kept), and the head at its `scored` tokens only, as in training: past
    `fused_head_bytes` of logits the chunked head's tiles, else those logits and a log-prob chunk."""
    hidden = arch["hidden_size"]
    parts = {"weights": parameters * FLOAT / MIB,
             "hidden states": tokens * hidden * FLOAT / MIB}
    if scored * vocab * FLOAT > fused_head_bytes:
        parts["chunked head"] = 2 * HEAD_CHUNK_ELEMENTS * FLOAT / MIB
    else:
        parts["logits at scored tokens"] = scored * vocab * FLOAT / MIB
        parts["log-prob chunk"] = LOGPROB_CHUNK_ELEMENTS * FLOAT / MIB
    return {"total_mb": sum(parts.values()), "parts": parts}
