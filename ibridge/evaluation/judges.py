"""Judges: score responses to prompts. A registry, so new judges plug in by name.

Every judge returns, per response, ``{"reward": float | None, "first_error": int | None}``;
the reward-model judge adds ``"truncated": bool`` (the conversation did not fit its context).
Win rates compare the model's reward with the fixed reference output's reward.
"""

from __future__ import annotations

import logging

import torch

from ibridge.data.formatting import as_messages
from ibridge.models import inference_dtype

log = logging.getLogger(__name__)


class GoldJudge:
    """The toy world's gold judge (docs/design.md §2): graded reward in [0, 1]."""

    name = "gold"
    scores = True

    def __init__(self, judge_cfg=None, runtime=None):
        pass

    def score(self, prompts: list, responses: list[str]) -> list[dict]:
        from ibridge.world import judge

        out = []
        for prompt, response in zip(prompts, responses, strict=True):
            verdict = judge(prompt, response)
            out.append({"reward": verdict.reward, "first_error": verdict.first_error})
        return out


class RewardModelJudge:
    """Any Hugging Face sequence-classification reward model, by hub name or local path.

    The conversation is rendered with the reward model's own chat template when it
    has one (as UltraFeedback-trained reward models expect), else as
    ``prompt\\n\\nresponse``; the reward is the first logit. Weights load from
    safetensors only; remote code stays off unless ``judge.trust_remote_code``.
    """

    name = "reward_model"
    scores = True

    def __init__(self, judge_cfg, runtime):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = judge_cfg.get("path")
        if not path:
            raise ValueError("judge.path is not set: expected a reward model name or folder")
        trust = bool(judge_cfg.get("trust_remote_code", False))
        self.runtime = runtime
        self.batch_size = int(judge_cfg.get("batch_size", 16))
        self.max_length = int(judge_cfg.get("max_length", 1024))
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # In the run's compute dtype (bf16 on GPUs): a judge only scores, and fp32 weights
        # under autocast would hold two copies of every weight.
        self.model = AutoModelForSequenceClassification.from_pretrained(
            str(path), use_safetensors=True, trust_remote_code=trust, dtype=inference_dtype(runtime)
        ).to(runtime.device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def _render(self, prompt, response: str) -> tuple[str, str]:
        """The whole conversation as text, and the part of it before the response."""
        messages = as_messages(prompt) + [{"role": "assistant", "content": response}]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
            head = self.tokenizer.apply_chat_template(as_messages(prompt), tokenize=False, add_generation_prompt=True)
            return text, head
        prompt_text = "\n".join(m["content"] for m in as_messages(prompt))
        return f"{prompt_text}\n\n{response}", f"{prompt_text}\n\n"

    def _encode(self, prompt, response: str) -> tuple[list[int], bool, bool]:
        """Token ids of the conversation, at most `max_length`: ``(ids, truncated, response_cut)``.

        The response is what is scored, so a conversation too long for the reward model
        loses the *start of its prompt* (keeping a leading BOS); only a response that alone
        exceeds `max_length` is itself cut, on the right.
        """
        text, head = self._render(prompt, response)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.max_length:
            return ids, False, False
        head_ids = self.tokenizer(head, add_special_tokens=False)["input_ids"]
        # The prompt is the tokens the conversation shares with its prompt-only rendering
        # (the template's assistant header included): everything after that is the response.
        split = 0
        while split < min(len(ids), len(head_ids)) and ids[split] == head_ids[split]:
            split += 1
        keep_bos = int(bool(ids) and ids[0] == self.tokenizer.bos_token_id and split > 0)
        room = self.max_length - keep_bos - (len(ids) - split)  # prompt tokens that still fit (< all of them)
        if room >= 0:
            return ids[:keep_bos] + ids[split - room : split] + ids[split:], True, False
        return (ids[:keep_bos] + ids[split:])[: self.max_length], True, True

    @torch.no_grad()
    def score(self, prompts: list, responses: list[str]) -> list[dict]:
        """``{"reward", "first_error": None, "truncated"}`` per response; ``truncated`` says the
        conversation was longer than ``judge.max_length`` (its prompt was shortened from the left)."""
        encoded = [self._encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        cut = sum(e[2] for e in encoded)
        if cut:
            log.warning("reward-model judge: %d of %d responses alone exceed judge.max_length=%d and were cut",
                        cut, len(encoded), self.max_length)
        rewards: list[float] = []
        for start in range(0, len(encoded), self.batch_size):
            ids = [{"input_ids": e[0]} for e in encoded[start : start + self.batch_size]]
            batch = self.tokenizer.pad(ids, padding=True, return_tensors="pt").to(self.runtime.device)
            with self.runtime.autocast():
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            rewards += logits[:, 0].float().cpu().tolist()  # (B,)
        return [{"reward": r, "first_error": None, "truncated": e[1]} for r, e in zip(rewards, encoded, strict=True)]


class NoJudge:
    """Export only: generations are written, nothing is scored."""

    name = "none"
    scores = False

    def __init__(self, judge_cfg=None, runtime=None):
        pass

    def score(self, prompts: list, responses: list[str]) -> list[dict]:
        return [{"reward": None, "first_error": None} for _ in responses]


JUDGES = {"gold": GoldJudge, "reward_model": RewardModelJudge, "none": NoJudge}


def build_judge(judge_cfg, runtime=None):
    name = judge_cfg["name"]
    if name not in JUDGES:
        raise ValueError(f"judge={name!r}: expected one of {', '.join(sorted(JUDGES))}")
    return JUDGES[name](judge_cfg, runtime)
