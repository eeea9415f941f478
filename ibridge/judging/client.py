"""The judge's endpoint: the openai client, one judging request, and the check made before any generation.

The client is the real ``openai`` one (what alpaca_eval's decoder uses), pointed at
``judge.base_url`` with the key from ``judge.api_key_env``, or built by alpaca_eval's
``get_all_clients`` from ``judge.client_config`` (its client-config YAML: several keys or
endpoints, requests spread over them). The client itself retries 408, 409, 429, 5xx and
connection errors ``judge.max_retries`` times with exponential backoff (0.5 s doubling up
to 8 s, with jitter; a server's ``Retry-After`` is honoured up to 2 min); what still fails
is a :class:`RequestFailed` naming the endpoint and the status.
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass

from ibridge.judging.annotator import Annotator, Pair
from ibridge.judging.settings import JudgeError, JudgeSettings

# A fixed pair the endpoint check judges: its answer must carry top log-probabilities.
PROBE = Pair(instruction="Reply with one word: yes.", output="yes", reference="Yes.")


class RequestFailed(RuntimeError):
    """A judging request that failed after the client's retries (one line)."""


@dataclass
class Answer:
    """One judging request's answer: the first choice as a dict (with ``logprobs``), the
    tokens billed, and the model name the server reported."""

    choice: dict
    prompt_tokens: int
    completion_tokens: int
    served_model: str


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text[:300] + ("…" if len(text) > 300 else "")


class JudgeClient:
    """Thread-safe: the openai client pools connections; requests rotate over the clients."""

    def __init__(self, settings: JudgeSettings, annotator: Annotator):
        import openai

        for name in ("httpx", "httpx2"):  # one INFO line per request otherwise (Hydra logs INFO)
            logging.getLogger(name).setLevel(logging.WARNING)
        self.settings, self.annotator = settings, annotator
        options = {"max_retries": settings.max_retries, "timeout": settings.timeout_s}
        if settings.client_config is not None:
            _, _, utils, decoder = _alpaca_modules()
            self.clients = utils.get_all_clients(
                settings.client_config, model_name=annotator.model, default_client_class="openai.OpenAI",
                get_backwards_compatible_configs=decoder._get_backwards_compatible_configs, **options)
            self.where = str(settings.client_config)
        else:
            self.clients = [openai.OpenAI(base_url=settings.base_url, api_key=settings.api_key(), **options)]
            self.where = settings.base_url
        self._turn = itertools.cycle(range(len(self.clients)))
        self._lock = threading.Lock()

    def request(self, messages: list[dict]) -> Answer:
        """One chat completion with the annotator's settings (max_tokens 1, logprobs, top_logprobs)."""
        import openai

        with self._lock:
            client = self.clients[next(self._turn)]
        try:
            response = client.chat.completions.create(model=self.annotator.model, messages=messages,
                                                      **self.annotator.request_kwargs)
        except openai.AuthenticationError as err:
            raise JudgeError(f"judge at {self.where} rejected the API key from ${self.settings.api_key_env} "
                             f"(401: {_one_line(err)})") from None
        except openai.NotFoundError as err:
            raise JudgeError(f"judge.model={self.annotator.model}: not served at {self.where} "
                             f"(404: {_one_line(err)})") from None
        except openai.BadRequestError as err:
            raise JudgeError(f"judge at {self.where} refused the judging request (400: {_one_line(err)}); it must "
                             f"accept {self.annotator.request_kwargs}") from None
        except openai.APIConnectionError as err:  # also timeouts: after the client's retries
            raise RequestFailed(f"judge at {self.where} unreachable after {self.settings.max_retries} retries "
                                f"({type(err).__name__}: {_one_line(err.__cause__ or err)})") from None
        except openai.APIStatusError as err:  # 429 and 5xx left after the client's retries
            raise RequestFailed(f"judge at {self.where} answered {err.status_code} after "
                                f"{self.settings.max_retries} retries ({_one_line(err)})") from None
        if not response.choices:
            raise RequestFailed(f"judge at {self.where} answered without choices")
        usage = response.usage
        return Answer(choice=response.choices[0].model_dump(), served_model=str(response.model or ""),
                      prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                      completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0))


def _alpaca_modules():
    from ibridge.judging.annotator import import_alpaca_eval

    return import_alpaca_eval()


def check_answer(annotator: Annotator, answer: Answer) -> None:
    """Raise JudgeError unless the answer carries the log-probabilities the parser reads."""
    annotator.preference(answer.choice, model_first=False)


def endpoint_error(err: Exception, where: str) -> JudgeError:
    """The endpoint check's one-line error for a request that failed."""
    if isinstance(err, JudgeError):
        return err
    return JudgeError(f"judge endpoint check failed: {err} (is the server at {where} running? "
                      f"judge.base_url sets it)")
