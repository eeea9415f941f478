"""Judges: score responses to prompts. A registry, so new judges plug in by name.

Every judge returns, per response, ``{"reward": float | None, "first_error": int | None}``.
Win rates compare the model's reward with the fixed reference output's reward.
"""

from __future__ import annotations

import torch

from ibridge.data.formatting import as_messages


class GoldJudge:
    """The toy world's gold judge (DESIGN.md §2): graded reward in [0, 1]."""

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
        self.model = AutoModelForSequenceClassification.from_pretrained(
            str(path), use_safetensors=True, trust_remote_code=trust, dtype=torch.float32
        ).to(runtime.device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def _render(self, prompt, response: str) -> str:
        messages = as_messages(prompt) + [{"role": "assistant", "content": response}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        prompt_text = "\n".join(m["content"] for m in as_messages(prompt))
        return f"{prompt_text}\n\n{response}"

    @torch.no_grad()
    def score(self, prompts: list, responses: list[str]) -> list[dict]:
        texts = [self._render(p, r) for p, r in zip(prompts, responses, strict=True)]
        rewards: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                max_length=self.max_length, add_special_tokens=False,
            ).to(self.runtime.device)
            with self.runtime.autocast():
                logits = self.model(**batch).logits  # (B, num_labels)
            rewards += logits[:, 0].float().cpu().tolist()
        return [{"reward": r, "first_error": None} for r in rewards]


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
