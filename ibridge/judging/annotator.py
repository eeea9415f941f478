"""alpaca_eval's annotator, taken apart: its config, prompt template, position randomisation and parser.

What ibridge takes from the ``alpaca-eval`` package (the ``judge`` extra; imported here
only, and only when ``judge=alpaca_eval`` runs):

- the annotator config (``weighted_alpaca_eval_gpt4_turbo`` by default): the judge model,
  its decoding settings (``max_tokens: 1``, ``logprobs``, ``top_logprobs: 5``) and the
  parser settings (``m`` over ``m``/``M``, not binarised);
- the prompt template, filled by ``alpaca_eval.utils.make_prompts`` and turned into chat
  messages by ``alpaca_eval.utils.prompt_to_chatml``, exactly as alpaca_eval sends them;
- which prompts show the model's output first: alpaca_eval's ``RandomSwitchTwoColumnsProcessor``
  decision, ``random.Random("is_switched_outputs" + instruction + seed)`` (so the positions
  are those ``alpaca_eval evaluate`` would use for the same instructions and seed);
- the parser ``alpaca_eval.completion_parsers.logprob_parser``: ``2 - P(m)``, with
  ``P(m) = exp(lp_m) / (exp(lp_m) + exp(lp_M))`` over the first token's top log-probabilities.

What it does not take, and why: alpaca_eval's ``PairwiseAnnotator`` and its
``openai_completions`` decoder. The decoder returns an empty completion once its retries are
spent (the annotator then drops that prompt: a smaller n, silently), sends every batch's
requests before returning any, and prints a progress bar per call; the annotator caches all
judgments in one JSON file per annotator, keyed without the template. ibridge sends each
request itself through the openai client (:mod:`ibridge.judging.client`) and caches each
judgment as it arrives (:mod:`ibridge.judging.cache`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from ibridge.judging.settings import JudgeError, JudgeSettings

# alpaca_eval's SinglePairwiseAnnotator names its switch column so; the name is part of the seed.
SWITCH_COLUMN = "is_switched_outputs"


def import_alpaca_eval():
    """The alpaca_eval modules ibridge uses; a one-line error when the extra is missing.

    Importing alpaca_eval sets the root logger to INFO (its annotators module does so at
    import); the level is put back, so ibridge's own logging is unchanged.
    """
    root = logging.getLogger()
    level = root.level
    try:
        with warnings.catch_warnings():  # its `import pkg_resources` warns that the API is deprecated
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
            from alpaca_eval import completion_parsers, constants, utils
            from alpaca_eval.decoders import openai as openai_decoder
    except ImportError as err:
        raise JudgeError(f"judge=alpaca_eval needs the judge extra: pip install 'ibridge[judge]' ({err})") from None
    finally:
        root.setLevel(level)
    return completion_parsers, constants, utils, openai_decoder


@dataclass(frozen=True)
class Pair:
    """One comparison: the prompt, the model's output and the fixed reference output."""

    instruction: str
    output: str
    reference: str


class Annotator:
    """One alpaca_eval annotator config, ready to build requests and parse answers."""

    def __init__(self, settings: JudgeSettings):
        parsers, constants, utils, decoder = import_alpaca_eval()
        self._utils, self._decoder = utils, decoder
        self.settings = settings
        path = Path(settings.annotator).expanduser()
        config_file = path if path.exists() else Path(constants.EVALUATORS_CONFIG_DIR) / settings.annotator
        if config_file.is_dir():
            config_file = config_file / "configs.yaml"
        if not config_file.is_file():
            raise JudgeError(f"judge.annotator={settings.annotator}: neither a file nor one of alpaca_eval's "
                             f"annotator configs (e.g. weighted_alpaca_eval_gpt4_turbo)")
        configs = utils.load_configs(config_file)
        self.name, config = next(iter(configs.items()))
        if config.get("fn_completion_parser") != "logprob_parser" or int(config.get("batch_size", 1)) != 1:
            raise JudgeError(f"judge.annotator={settings.annotator}: ibridge runs alpaca_eval's log-probability "
                             f"annotators with batch_size 1 (fn_completion_parser: logprob_parser), e.g. "
                             f"weighted_alpaca_eval_gpt4_turbo")
        # Templates are relative to evaluators_configs/ (alpaca_eval's base_dir: the config's grandparent).
        template_file = config_file.parents[1] / config["prompt_template"]
        self.template = template_file.read_text(encoding="utf-8")
        kwargs = dict(config.get("completions_kwargs") or {})
        self.model = settings.model or str(kwargs.pop("model_name"))
        kwargs.pop("model_name", None)
        kwargs.pop("requires_chatml", None)  # ibridge always speaks the chat-completions API
        kwargs.setdefault("top_p", 1.0)  # what alpaca_eval's openai decoder sends by default
        self.request_kwargs = kwargs
        self.parser_kwargs = dict(config.get("completion_parser_kwargs") or {})
        self._parse = parsers.logprob_parser

    def identity(self) -> dict:
        """What makes two judgments of the same pair interchangeable: the annotator, the judge
        model and its decoding settings, the parser and the template's text (the cache key)."""
        return {"annotator": self.name, "model": self.model, "request": self.request_kwargs,
                "parser": self.parser_kwargs,
                "template_sha256": hashlib.sha256(self.template.encode()).hexdigest()}

    def model_first(self, instruction: str) -> bool:
        """Whether the judge sees the model's output first for this instruction (alpaca_eval's
        switch of output_1 = reference and output_2 = model, seeded by the instruction)."""
        seed = SWITCH_COLUMN + instruction + str(self.settings.seed)
        return bool(self._utils.random_seeded_choice(seed=seed, choices=[False, True]))

    def messages(self, pair: Pair, model_first: bool) -> list[dict]:
        """The chat messages alpaca_eval sends for this pair in this order."""
        import pandas as pd

        first, second = (pair.output, pair.reference) if model_first else (pair.reference, pair.output)
        row = pd.DataFrame([{"instruction": pair.instruction, "output_1": first, "output_2": second}])
        prompts, _ = self._utils.make_prompts(row, self.template, batch_size=1)
        return self._utils.prompt_to_chatml(prompts[0].strip())

    def preference(self, choice: dict, model_first: bool) -> float | None:
        """P(the model's output is better) from one answer's top log-probabilities; None when
        neither ``m`` nor ``M`` is among them. Raises JudgeError when the answer has no
        log-probabilities at all."""
        content = (choice.get("logprobs") or {}).get("content")
        if not content or not content[0].get("top_logprobs"):
            raise JudgeError(f"judge.model={self.model} returned no log-probabilities (logprobs / top_logprobs); "
                             f"AlpacaEval 2's weighted judge reads P(m) from them: use a server and model that "
                             f"return them (vLLM does by default, up to --max-logprobs)")
        value = self._parse(choice, **self.parser_kwargs)[0]  # 2 - P(first output better)
        if value is None or not math.isfinite(value):
            return None
        first_better = 2.0 - float(value)
        return first_better if model_first else 1.0 - first_better

    def price_per_token(self) -> float | None:
        """USD per token: ``judge.price_per_million_tokens``, else alpaca_eval's price for the
        model (known OpenAI models only); None when unknown."""
        if self.settings.price_per_million_tokens is not None:
            return self.settings.price_per_million_tokens / 1e6
        price = self._decoder._get_price_per_token(self.model)  # NaN (and a warning) for unknown models
        return None if price is None or not math.isfinite(price) else float(price)


def instruction_text(prompt) -> str:
    """A prompt as the judge's instruction: a string as is; a conversation's single user
    message as its text; longer conversations as ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    messages = list(prompt)
    if len(messages) == 1 and isinstance(messages[0], dict):
        return str(messages[0].get("content", ""))
    return "\n\n".join(f"{m.get('role', '')}: {m.get('content', '')}" if isinstance(m, dict) else json.dumps(m)
                       for m in messages)

