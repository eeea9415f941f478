"""The ``judge.*`` settings of ``judge=alpaca_eval`` (conf/judge/alpaca_eval.yaml), checked up front.

Every problem is a one-line :class:`JudgeError` naming the key. The API key is read from
the environment variable ``judge.api_key_env`` names and never stored in a config, a log
or a cache entry (docs/design.md §3).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ibridge.config import ConfigError

OPENAI_BASE_URL = "https://api.openai.com/v1"


class JudgeError(ConfigError):
    """The judge cannot be used as configured (a key, the endpoint, the annotator): one line."""


@dataclass(frozen=True)
class JudgeSettings:
    annotator: str  # an alpaca_eval annotator config: a name under its evaluators_configs/, or a folder/file
    model: str | None  # None: the annotator config's model_name
    base_url: str  # the OpenAI-compatible endpoint, .../v1
    api_key_env: str | None  # None: a server without keys (a local vLLM)
    client_config: Path | None  # alpaca_eval's client-config YAML instead of base_url / api_key_env
    concurrency: int
    max_retries: int
    timeout_s: float
    price_per_million_tokens: float | None  # None: alpaca_eval's price for known OpenAI models
    seed: int  # alpaca_eval's seed of the position randomisation

    def api_key(self) -> str:
        """The key from the environment; a fixed placeholder when none is needed (the openai
        client refuses to start without one)."""
        if self.api_key_env is None:
            return "no-key"
        value = os.environ.get(self.api_key_env)
        if not value:
            raise JudgeError(f"judge.api_key_env={self.api_key_env}: that environment variable is not set; export "
                             f"the key there, or set judge.api_key_env=null for a server that needs none (a local vLLM)")
        return value


def _number(judge_cfg, key: str, kind, minimum):
    value = judge_cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise JudgeError(f"judge.{key}={value!r}: expected {'an integer' if kind is int else 'a number'} >= {minimum}")
    if value < minimum:
        raise JudgeError(f"judge.{key}={value!r}: expected {'an integer' if kind is int else 'a number'} >= {minimum}")
    return kind(value)


def judge_settings(judge_cfg) -> JudgeSettings:
    """The checked settings of a ``judge=alpaca_eval`` config (reads no file, makes no request)."""
    price = judge_cfg.get("price_per_million_tokens")
    if price is not None:
        price = _number(judge_cfg, "price_per_million_tokens", float, 0)
    client_config = judge_cfg.get("client_config")
    if client_config:
        client_config = Path(str(client_config)).expanduser()
        if not client_config.is_file():
            raise JudgeError(f"judge.client_config={client_config}: no such file (expected alpaca_eval's "
                             f"client-config YAML, e.g. its openai_configs.yaml)")
    annotator = str(judge_cfg.get("annotator") or "")
    if not annotator:
        raise JudgeError("judge.annotator is empty: expected an alpaca_eval annotator config, e.g. "
                         "weighted_alpaca_eval_gpt4_turbo")
    base_url = str(judge_cfg.get("base_url") or OPENAI_BASE_URL).rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise JudgeError(f"judge.base_url={base_url}: expected an http(s) URL ending in /v1, "
                         f"e.g. http://localhost:8000/v1")
    return JudgeSettings(
        annotator=annotator,
        model=str(judge_cfg["model"]) if judge_cfg.get("model") else None,
        base_url=base_url,
        api_key_env=str(judge_cfg["api_key_env"]) if judge_cfg.get("api_key_env") else None,
        client_config=client_config or None,
        concurrency=_number(judge_cfg, "concurrency", int, 1),
        max_retries=_number(judge_cfg, "max_retries", int, 0),
        timeout_s=_number(judge_cfg, "timeout_s", float, 0.001),
        price_per_million_tokens=price,
        seed=_number(judge_cfg, "seed", int, 0),
    )
