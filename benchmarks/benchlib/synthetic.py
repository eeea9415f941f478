"""A model of any vocabulary, with a word-level tokenizer of that size and UltraChat-like data.

No hub access is needed: the tokenizer's words are ``w0, w1, ...`` after the toy world's
special tokens, with its chat template (ibridge/world/tokenizer.py), so ibridge's and TRL's
encodings are the same token for token; the model is randomly initialised.
"""

from __future__ import annotations

import json
from pathlib import Path


def build_tokenizer(vocab: int):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ibridge.world.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS

    specials = list(SPECIAL_TOKENS.values())
    words = [f"w{i}" for i in range(vocab - len(specials))]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(specials + words)},
                                         unk_token=SPECIAL_TOKENS["unk"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=SPECIAL_TOKENS["bos"], eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"], unk_token=SPECIAL_TOKENS["unk"],
        extra_special_tokens=[SPECIAL_TOKENS[k] for k in ("user", "assistant", "end")],
        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    assert len(tokenizer) == vocab
    return tokenizer


def save_model(folder: Path, family: str, vocab: int, arch: dict, seed: int = 0) -> tuple[Path, int]:
    """A randomly initialised `family` ("llama", "qwen2") model and its tokenizer in `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(vocab)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **arch))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder, sum(p.numel() for p in model.parameters())


def conversations(n_sft: int, n_dpo: int, vocab: int, max_length: int, prompt_median: float = 90,
                  response_median: float = 230, seed: int = 0) -> dict:
    """Demonstrations and preference pairs of Zipf-distributed words with UltraChat-like lengths:
    log-normal prompts (median `prompt_median`, long-tailed) and responses, prompt + response
    within `max_length` tokens (the chat template adds 4)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_words = vocab - 7  # the toy world's special tokens come first
    zipf = 1.0 / (np.arange(n_words) + 10.0) ** 1.07
    zipf /= zipf.sum()

    def text(n: int) -> str:
        return " ".join(f"w{i}" for i in rng.choice(n_words, size=n, p=zipf))

    def response_length(prompt: int) -> int:
        return min(int(np.clip(rng.lognormal(np.log(response_median), 0.65), 4, 900)), max_length - 4 - prompt)

    def prompt_length() -> int:
        return int(np.clip(rng.lognormal(np.log(prompt_median), 0.9), 3, min(600, max_length // 2)))

    demonstrations, preferences = [], []
    for _ in range(n_sft):
        prompt = prompt_length()
        demonstrations.append({"prompt": text(prompt), "response": text(response_length(prompt))})
    for _ in range(n_dpo):
        prompt = prompt_length()
        preferences.append({"prompt": text(prompt), "chosen": text(response_length(prompt)),
                            "rejected": text(response_length(prompt))})
    return {"demonstrations": demonstrations, "preferences": preferences}


def write_data(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path
