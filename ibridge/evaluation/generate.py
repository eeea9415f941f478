"""Batched generation with the KV cache, for evaluation prompts."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ibridge.data.end_of_turn import cut_at_stop, generation_stops
from ibridge.data.formatting import prompt_ids
from ibridge.distributed import DistInfo, merge_shares, shard_of
from ibridge.progress import progress_bar
from ibridge.runtime import Runtime

# Every `generation_config` setting that changes which token is drawn (logits processors
# and warpers), the decoding mode, or where generation stops, at the value that leaves
# pi(.|s) untouched. A checkpoint's generation_config.json may set any of them (hub
# checkpoints often set temperature and top_p); then sampled responses would not be
# draws from pi and the sampled KL (docs/design.md §3) would be biased. They go to generate() as keyword
# arguments, which take precedence over the checkpoint's values; a GenerationConfig
# object would not do, since transformers fills its None fields from the checkpoint's.
PURE_DECODING = {
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "top_h": None,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "min_length": 0,
    "min_new_tokens": None,
    "exponential_decay_length_penalty": None,
    "guidance_scale": None,
    "remove_invalid_values": False,
    "renormalize_logits": False,
    "watermarking_config": None,
    "num_beams": 1,
    "num_return_sequences": 1,
    "penalty_alpha": None,
    "dola_layers": None,
    "constraints": None,
    "force_words_ids": None,
    "prompt_lookup_num_tokens": None,
    "token_healing": False,
    "stop_strings": None,
    "max_time": None,
    "return_dict_in_generate": False,
}
# Warpers that transformers applies only when sampling: left out of greedy decoding, where
# they are inert and setting them only draws warnings.
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "top_h", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def decoding_settings(do_sample: bool, temperature: float) -> dict:
    """Keyword arguments for ``model.generate``: greedy, or sampling from pi at `temperature`, nothing else."""
    from transformers import GenerationConfig

    known = GenerationConfig()
    settings = {key: value for key, value in PURE_DECODING.items() if hasattr(known, key)}
    settings["do_sample"] = do_sample
    if do_sample:
        settings["temperature"] = temperature
    else:
        settings = {key: value for key, value in settings.items() if key not in SAMPLING_ONLY}
    return settings


def batch_seed(seed: int, batch: int) -> int:
    """The seed of the `batch`-th generation batch: a function of (seed, batch) alone, so a
    batch draws the same tokens whichever rank generates it and whatever ran before."""
    return int(np.random.SeedSequence([int(seed) & (2**64 - 1), int(batch)]).generate_state(1, dtype=np.uint64)[0]) >> 1


@contextlib.contextmanager
def _seeded(seed: int | None, batch: int, runtime: Runtime):
    """The global RNG (the one ``model.generate`` samples with) seeded for one batch, and
    restored afterwards; nothing when `seed` is None."""
    if seed is None:
        yield
        return
    devices = [runtime.device.index or 0] if runtime.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(batch_seed(seed, batch))
        yield


def generation_batches(prompt_lengths: list[int], max_new_tokens: int, batch_size: int,
                       max_tokens: int) -> list[list[int]]:
    """Prompt indices in generation batches: shortest prompts first, consecutive in that order,
    each of at most `batch_size` rows and at most `max_tokens` tokens of KV cache, rows x
    (longest prompt + `max_new_tokens`); a prompt longer than that alone forms a batch.

    The cache of a batch grows to rows x (longest prompt + new tokens) x (bytes per token:
    128 KiB at Llama-3-8B in bf16, docs/memory.md), whichever rank generates it. Where the
    budget does not bind (short prompts, the toy world), the batches are the `batch_size`
    blocks of the length order.
    """
    order = sorted(range(len(prompt_lengths)), key=lambda i: prompt_lengths[i])
    batches: list[list[int]] = []
    for index in order:
        # Ascending order: the newest prompt is the batch's longest.
        if batches and len(batches[-1]) < batch_size and \
                (len(batches[-1]) + 1) * (prompt_lengths[index] + max_new_tokens) <= max_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list,
    runtime: Runtime,
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    desc: str | None = "generate",
    seed: int | None = None,
    shard: DistInfo | None = None,
    max_batch_tokens: int | None = None,
) -> list[dict]:
    """One response per prompt: ``{"text", "prompt_ids", "response_ids"}``.

    Prompts are left-padded (generation appends on the right) and batched by
    length, so batches carry little padding: at most `batch_size` rows and, with
    `max_batch_tokens`, at most that many tokens of prompt and new tokens per batch
    (:func:`generation_batches`). Generation stops at EOS or at the
    chat template's end-of-turn token, or its end-of-turn text where the template ends a
    turn with text (`ibridge.data.end_of_turn`); ``response_ids`` stop at and include the
    first of them (the token that completes the text), so that log pi(y|x) covers the
    decision to stop, and ``text`` is the reply without it. Whatever the checkpoint's
    generation_config says, no logits processor is applied (`PURE_DECODING`).

    With `seed`, batch k samples from an RNG seeded by :func:`batch_seed` (seed, k) and the
    caller's RNG is left as it was. With `shard` (every rank calling), each rank generates
    every world_size-th batch of the one-process plan and every rank returns all results:
    the same batches (same padding) and, with `seed`, the same draws as one process.
    """
    model.eval()
    pad = tokenizer.pad_token_id
    stops, stop_texts = generation_stops(tokenizer)
    settings = decoding_settings(do_sample, temperature)
    if stop_texts:  # the template ends a turn with text, not one token (ibridge.data.end_of_turn)
        settings.update(stop_strings=stop_texts, tokenizer=tokenizer)
    encoded = [prompt_ids(tokenizer, prompt) for prompt in prompts]
    results: list[dict | None] = [None] * len(prompts)
    batches = generation_batches([len(ids) for ids in encoded], max_new_tokens, batch_size,
                                 max_batch_tokens or 2**62)
    mine = shard_of(len(batches), shard) if shard is not None else range(len(batches))
    for k in progress_bar(mine, desc=desc, unit="batch", disable=desc is None):
        chunk = batches[k]
        width = max(len(encoded[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, T)
        attention = torch.zeros_like(input_ids)
        for row, index in enumerate(chunk):
            ids = encoded[index]
            input_ids[row, width - len(ids) :] = torch.as_tensor(ids)
            attention[row, width - len(ids) :] = 1
        with _seeded(seed, k, runtime), runtime.autocast():
            output = model.generate(
                input_ids=input_ids.to(runtime.device),
                attention_mask=attention.to(runtime.device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=stops,
                use_cache=True,
                **settings,
            )
        new_tokens = output[:, width:].cpu().tolist()
        for row, index in enumerate(chunk):
            # A row that stopped is padded after its stop; one that did not ran to
            # max_new_tokens and holds only generated tokens (a generated pad id included).
            tokens, text = cut_at_stop(tokenizer, new_tokens[row], stops, stop_texts)
            results[index] = {"text": text, "prompt_ids": encoded[index], "response_ids": tokens}
    if shard is not None:
        results = merge_shares(results, shard)
    return results  # type: ignore[return-value]
