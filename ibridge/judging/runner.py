"""Judge every pair once: identical outputs tie without a request, cached ones are read,
the rest go out ``judge.concurrency`` at a time, each cached as soon as it is answered.

A request that still fails after the client's retries stops the judging: no new requests
start, those in flight finish (and are cached), and :class:`JudgingIncomplete` says how
many judgments are kept and that running the same command again resumes (docs/design.md §3).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from tqdm.auto import tqdm

from ibridge.judging.annotator import Annotator, Pair
from ibridge.judging.cache import JudgmentCache, judgment_key
from ibridge.judging.client import JudgeClient, RequestFailed
from ibridge.judging.settings import JudgeError


class JudgingIncomplete(RuntimeError):
    """Some judgments could not be obtained; those that were are cached."""


@dataclass
class Judgment:
    preference: float | None  # P(model's output better); 0.5 for identical outputs; None: no m/M in the answer
    model_first: bool  # the judge saw the model's output first
    source: str  # "tie" (identical outputs, no request), "cache" or "request"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    served_model: str = ""

    @classmethod
    def from_record(cls, record: dict, source: str) -> Judgment:
        return cls(preference=record["preference"], model_first=bool(record["model_first"]), source=source,
                   prompt_tokens=int(record.get("prompt_tokens", 0)),
                   completion_tokens=int(record.get("completion_tokens", 0)),
                   served_model=str(record.get("served_model", "")))


def _record(annotator: Annotator, client: JudgeClient, pair: Pair, model_first: bool) -> dict:
    answer = client.request(annotator.messages(pair, model_first))
    top = answer.choice.get("logprobs", {}) or {}
    return {
        "preference": annotator.preference(answer.choice, model_first),
        "model_first": model_first,
        "top_logprobs": ((top.get("content") or [{}])[0] or {}).get("top_logprobs"),
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "served_model": answer.served_model,
        "judge": annotator.identity(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def judge_pairs(pairs: list[Pair], annotator: Annotator, make_client: Callable[[], JudgeClient],
                cache: JudgmentCache, concurrency: int, desc: str | None = "judge") -> list[Judgment]:
    """One :class:`Judgment` per pair, in order. `make_client` is called only if a request is needed."""
    identity = annotator.identity()
    results: list[Judgment | None] = [None] * len(pairs)
    todo: list[tuple[int, str, bool]] = []
    for index, pair in enumerate(pairs):
        first = annotator.model_first(pair.instruction)
        if pair.output == pair.reference:  # as alpaca_eval: identical outputs are a tie, never sent
            results[index] = Judgment(preference=0.5, model_first=first, source="tie")
            continue
        key = judgment_key(identity, pair.instruction, pair.output, pair.reference, first)
        cached = cache.get(key)
        if cached is not None:
            results[index] = Judgment.from_record(cached, "cache")
        else:
            todo.append((index, key, first))
    if todo:
        _request_all(todo, pairs, results, annotator, make_client(), cache, concurrency, desc)
    return results  # type: ignore[return-value]


def _request_all(todo, pairs, results, annotator, client, cache, concurrency, desc) -> None:
    stop = threading.Event()

    def work(index: int, key: str, first: bool) -> bool:
        if stop.is_set():
            return False
        try:
            record = _record(annotator, client, pairs[index], first)
        except (RequestFailed, JudgeError):
            stop.set()
            raise
        cache.put(key, record)
        results[index] = Judgment.from_record(record, "request")
        return True

    errors: list[Exception] = []
    with ThreadPoolExecutor(max_workers=concurrency) as pool, \
            tqdm(total=len(todo), desc=desc, unit="pair", disable=desc is None, dynamic_ncols=True) as bar:
        try:
            for future in as_completed([pool.submit(work, *item) for item in todo]):
                try:
                    if future.result():
                        bar.update(1)
                except (RequestFailed, JudgeError) as err:
                    errors.append(err)
        except BaseException:  # Ctrl-C, SIGTERM: the queued requests are not sent; those in flight are cached
            stop.set()
            raise
    if errors:
        kept = sum(result is not None and result.source != "tie" for result in results)
        new = sum(result is not None and result.source == "request" for result in results)
        raise JudgingIncomplete(
            f"judging stopped: {errors[0]}; {kept} of {sum(p.output != p.reference for p in pairs)} judgments are "
            f"in the cache ({new} new this time, {len(todo) - new} still to do): run the same command again to "
            f"resume; cached judgments are not requested again")
