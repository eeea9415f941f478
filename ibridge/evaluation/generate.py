"""Batched generation with the KV cache, for evaluation prompts."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ibridge.data.formatting import prompt_ids
from ibridge.runtime import Runtime


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
    desc: str = "generate",
) -> list[dict]:
    """One response per prompt: ``{"text", "prompt_ids", "response_ids"}``.

    Prompts are left-padded (generation appends on the right) and batched by
    length, so batches carry little padding. ``response_ids`` stop at and include
    the first EOS, so that log pi(y|x) covers the decision to stop.
    """
    model.eval()
    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    encoded = [prompt_ids(tokenizer, prompt) for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[dict | None] = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", dynamic_ncols=True):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, T)
        attention = torch.zeros_like(input_ids)
        for row, index in enumerate(chunk):
            ids = encoded[index]
            input_ids[row, width - len(ids) :] = torch.as_tensor(ids)
            attention[row, width - len(ids) :] = 1
        with runtime.autocast():
            output = model.generate(
                input_ids=input_ids.to(runtime.device),
                attention_mask=attention.to(runtime.device),
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_k=None,
                top_p=None,
                pad_token_id=pad,
                eos_token_id=eos,
                use_cache=True,
            )
        new_tokens = output[:, width:].cpu().tolist()
        for row, index in enumerate(chunk):
            tokens = new_tokens[row]
            if eos in tokens:
                tokens = tokens[: tokens.index(eos) + 1]
            else:
                tokens = [t for t in tokens if t != pad]
            results[index] = {
                "text": tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                "prompt_ids": encoded[index],
                "response_ids": tokens,
            }
    return results  # type: ignore[return-value]
