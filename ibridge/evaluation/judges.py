"""Judges: score a response to a prompt. A registry, so new judges plug in by name."""

from __future__ import annotations


class GoldJudge:
    """The toy world's gold judge (DESIGN.md §2): graded reward in [0, 1]."""

    name = "gold"

    def __init__(self, judge_cfg=None):
        pass

    def score(self, prompts: list, responses: list[str]) -> list[dict]:
        from ibridge.world import judge

        out = []
        for prompt, response in zip(prompts, responses, strict=True):
            verdict = judge(prompt, response)
            out.append({"reward": verdict.reward, "first_error": verdict.first_error})
        return out


JUDGES = {"gold": GoldJudge}


def build_judge(judge_cfg):
    name = judge_cfg["name"]
    if name not in JUDGES:
        raise ValueError(f"judge={name!r}: expected one of {', '.join(sorted(JUDGES))}")
    return JUDGES[name](judge_cfg)
