"""The hooks through which ``judge=alpaca_eval`` runs (docs/design.md §3).

- :func:`check_judge`: before a pipeline or ``ibridge eval`` generates anything, the key
  is looked up and the endpoint judges a fixed probe pair, which must come back with
  log-probabilities; any problem is a one-line error. The probe is cached like any other
  judgment (keyed by the endpoint too), so a rerun whose judgments are all cached sends
  nothing; if the server has gone since, the first uncached judgment says so.
- :func:`scoring_judge`: what scores single responses beside it (the toy world's gold
  judge, so that gold and judged win rates sit side by side; nothing on other data).
- :func:`judge_stage`: judge one evaluation's outputs against the reference outputs and
  merge the numbers into its metrics; the gold judge's win rates become ``gold_*``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ibridge.distributed import DistInfo, broadcast_from_main
from ibridge.io import write_json_atomic
from ibridge.judging.names import NAME

log = logging.getLogger(__name__)
# The gold judge's numbers, renamed when the judged ones take their place.
GOLD_RENAMES = {"win_rate": "gold_win_rate", "win_rate_ci": "gold_win_rate_ci", "lc_win_rate": "gold_lc_win_rate"}


def uses_alpaca_judge(cfg) -> bool:
    return str(cfg.judge.get("name")) == NAME


def scoring_judge(judge_cfg, source):
    """The judge config `build_judge` gets: `judge_cfg` itself, or for ``judge=alpaca_eval``
    the gold judge when the evaluation prompts are the toy world's, else none."""
    if str(judge_cfg.get("name")) != NAME:
        return judge_cfg
    from ibridge.data.sources import ToySource

    evals = source.source_of("eval") if hasattr(source, "source_of") else source
    return {"name": "gold" if isinstance(evals, ToySource) else "none"}


def _parts(cfg):
    from ibridge.judging.annotator import Annotator
    from ibridge.judging.cache import JudgmentCache
    from ibridge.judging.settings import judge_settings
    from ibridge.models import cache_root

    settings = judge_settings(cfg.judge)
    return settings, Annotator(settings), JudgmentCache(cache_root(cfg.model))


def _on_main(info: DistInfo, work):
    """`work()` on rank 0, its result (or its error, raised again) on every rank."""
    outcome = None
    if info.is_main:
        try:
            outcome = ("ok", work())
        except Exception as err:
            if not info.enabled:
                raise
            outcome = ("error", err)
    outcome = broadcast_from_main(outcome, info)
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]


def check_judge(cfg, info: DistInfo) -> None:
    """The endpoint check (module docstring); raises JudgeError, a one-line config error."""
    if not uses_alpaca_judge(cfg):
        return
    _on_main(info, lambda: _probe(cfg))


def _probe(cfg) -> None:
    from ibridge.judging.cache import judgment_key
    from ibridge.judging.client import PROBE, JudgeClient, check_answer, endpoint_error

    settings, annotator, cache = _parts(cfg)
    if settings.client_config is None:
        settings.api_key()  # a missing key fails here, with or without a cached probe
    where = str(settings.client_config or settings.base_url)
    key = judgment_key({**annotator.identity(), "endpoint_check": where}, PROBE.instruction, PROBE.output,
                       PROBE.reference, False)
    if cache.get(key) is not None:
        log.info("judge: %s at %s answered the endpoint check before (cached)", annotator.model, where)
        return
    try:
        answer = JudgeClient(settings, annotator).request(annotator.messages(PROBE, model_first=False))
        check_answer(annotator, answer)
    except Exception as err:
        raise endpoint_error(err, where) from None
    cache.put(key, {"endpoint": where, "served_model": answer.served_model,
                    "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens})
    log.info("judge: %s at %s returns log-probabilities", annotator.model, where)


def judge_stage(cfg, examples: list[dict], outputs: list[str], metrics: dict, out_dir: Path, info: DistInfo,
                generator: str) -> dict:
    """`metrics` with the judged numbers merged in (:mod:`ibridge.judging.metrics`); rank 0
    judges and writes ``annotations.json`` (AlpacaEval's annotation format) under `out_dir`."""
    judged = _on_main(info, lambda: _judge(cfg, examples, outputs, Path(out_dir), generator))
    merged = dict(metrics)
    if "gold_reward" in merged:
        for old, new in GOLD_RENAMES.items():
            if old in merged:
                merged[new] = merged.pop(old)
    merged.update(judged)
    return merged


def _judge(cfg, examples, outputs, out_dir: Path, generator: str) -> dict:
    from ibridge.judging.annotator import Pair, instruction_text
    from ibridge.judging.client import JudgeClient
    from ibridge.judging.metrics import judged_metrics
    from ibridge.judging.runner import judge_pairs

    settings, annotator, cache = _parts(cfg)
    pairs = [Pair(instruction_text(ex["prompt"]), out, str(ex["reference"])) for ex, out in zip(examples, outputs,
                                                                                               strict=True)]
    judgments = judge_pairs(pairs, annotator, lambda: JudgeClient(settings, annotator), cache, settings.concurrency,
                            desc=f"judge ({generator})")
    indices = [ex.get("alpaca_index") for ex in examples]
    metrics = judged_metrics(
        judgments, outputs, [p.reference for p in pairs], price=annotator.price_per_token(),
        judge=f"{NAME}/{annotator.name}", model=annotator.model,
        bootstrap_resamples=int(cfg.eval.bootstrap_resamples), seed=int(cfg.seed),
        alpaca_indices=indices if all(isinstance(i, int) for i in indices) else None)
    log.info("judge: %d judgments (%d new requests, %d cached, %d ties)", len(judgments), metrics["judge_requests"],
             metrics["judge_cached"], metrics["n_ties"])
    rows = [{"instruction": p.instruction, "output_1": p.reference, "generator_1": "reference",
             "output_2": p.output, "generator_2": generator, "annotator": annotator.name,
             "preference": None if j.preference is None else 1.0 + j.preference,  # AlpacaEval: 2 = output_2 wins
             "model_first": j.model_first, "source": j.source,
             "tokens": j.prompt_tokens + j.completion_tokens} for p, j in zip(pairs, judgments, strict=True)]
    write_json_atomic(out_dir / "annotations.json", rows)
    return metrics
