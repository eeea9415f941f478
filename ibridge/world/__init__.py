"""The synthetic toy world: tasks, gold judge, data splits and tokenizer (docs/design.md §2).

No hub is reachable from a test machine, so the default ``model=toy data=toy`` builds
everything here, deterministically from :attr:`WorldConfig.seed`, in well under a
second, while keeping the shape of the paper's real setting (base model -> SFT on
demonstrations -> DPO on preference pairs -> win rate against fixed reference outputs).

Prompts are instructions ``"<task> <symbols>"`` (e.g. ``"sort 3 1 4"``) over the digit
words; every task has a computable answer (:func:`solve`), so the gold :func:`judge` can
grade any response: the share of the answer right before the first mistake, divided by
the longer of answer and response (extra tokens are penalised), plus the position of
the first wrong token (for the credit-assignment analysis of docs/design.md §1).

How each split imitates the real setting (docs/design.md §2):

- ``corpus`` (pretraining text, like the web text a base model sees): plain lines
  ``"sort 3 1 4 = 1 3 4"`` over the full length range, with a share ``corpus_noise`` of
  the answers corrupted, so the base model knows the tasks imperfectly, and without any
  chat special token, so it does not know the chat format. It may overlap with the
  demonstrations (as pretraining data does) but never contains an eval prompt.
- ``demonstrations`` (UltraChat-200k, the SFT data): clean correct answers, drawn from a
  *narrower* slice of the prompt distribution (``min_len`` .. ``demo_max_len`` symbols)
  than evaluation, as UltraChat is narrower than AlpacaEval.
- ``preferences`` (UltraFeedback binarized, the DPO data): for each prompt (full length
  range) ``responses_per_prompt`` candidates from a mixture of noisy "generator models"
  (per-token error rates ``generator_noise``, edits by substitution / deletion /
  insertion), graded by the gold judge (standing in for GPT-4 ratings); chosen = best,
  rejected = worst; prompts whose best and worst tie are dropped.
- ``heldout_pairs``: the same construction on disjoint prompts, for the accuracy of the
  implicit reward at ranking chosen above rejected (SFT as implicit reward learning).
- ``eval`` (AlpacaEval): prompts over the full length range, each with the output of a
  fixed noisy reference generator (``reference_noise``, as AlpacaEval compares against
  fixed GPT-4 reference outputs) and its gold reward, so a policy's win rate is the share
  of prompts where its reward beats the reference's.

No prompt appears in two of demonstrations / preferences / heldout_pairs / eval.
"""

from .build import CORPUS_CORRUPTION_RATE, World, build_world, eval_slices, format_corpus_line, perturb
from .config import WORLD_FORMAT_VERSION, WorldConfig
from .tasks import DIGITS, TASKS, Judgement, judge, judge_words, make_prompt, parse_prompt, solve
from .tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer, vocabulary

__all__ = [
    "CHAT_TEMPLATE",
    "CORPUS_CORRUPTION_RATE",
    "DIGITS",
    "SPECIAL_TOKENS",
    "TASKS",
    "WORLD_FORMAT_VERSION",
    "Judgement",
    "World",
    "WorldConfig",
    "build_tokenizer",
    "build_world",
    "eval_slices",
    "format_corpus_line",
    "judge",
    "judge_words",
    "make_prompt",
    "parse_prompt",
    "perturb",
    "solve",
    "vocabulary",
]
