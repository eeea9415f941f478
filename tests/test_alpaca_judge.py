"""judge=alpaca_eval against a real HTTP server on 127.0.0.1 (ibridge/judging/toy_server.py).

The server speaks OpenAI's chat-completions API with logprobs/top_logprobs; its P(m) is a
logistic in the gold rewards of the two outputs it is shown. Requests go through the real
openai client, the prompts are built from alpaca_eval's template, and the answers parsed
by alpaca_eval's log-prob parser. Nothing here reaches the internet: every client is
pointed at the local server, and no real key is used.
"""

from __future__ import annotations

import math
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from ibridge.judging.annotator import Annotator, Pair
from ibridge.judging.cache import JudgmentCache
from ibridge.judging.client import JudgeClient
from ibridge.judging.metrics import judged_metrics
from ibridge.judging.names import LC_ONE_MODEL
from ibridge.judging.runner import JudgingIncomplete, judge_pairs
from ibridge.judging.settings import JudgeError, judge_settings
from ibridge.judging.toy_server import ToyJudgeServer
from ibridge.world import WorldConfig, build_world
from ibridge.world import judge as gold_judge

MODEL = "toy-gold-judge"
TEMPERATURE = 0.1


def settings(base_url: str, **overrides):
    cfg = {"annotator": "weighted_alpaca_eval_gpt4_turbo", "model": MODEL, "base_url": base_url,
           "api_key_env": None, "client_config": None, "concurrency": 4, "max_retries": 4, "timeout_s": 10,
           "price_per_million_tokens": 10.0, "seed": 0, **overrides}
    return judge_settings(cfg)


@pytest.fixture(scope="module")
def pairs() -> list[Pair]:
    """The toy world's 200 evaluation prompts: a third answered exactly as the reference
    (identical: a tie, never sent), the rest cut short or run on, so the gold rewards differ."""
    world = build_world(WorldConfig())
    out = []
    for i, example in enumerate(world.eval):
        words = example["reference"].split()
        output = example["reference"] if i % 3 == 0 else " ".join(words[:-1] if i % 3 == 1 else words + ["1"])
        out.append(Pair(example["prompt"], output, example["reference"]))
    return out


def expected_preference(pair: Pair) -> float:
    """P(model better) from the server's rule, computed here on its own: 0.5 for identical
    outputs, else sigmoid((gold(model) - gold(reference)) / T)."""
    if pair.output == pair.reference:
        return 0.5
    diff = gold_judge(pair.instruction, pair.output).reward - gold_judge(pair.instruction, pair.reference).reward
    return 1.0 / (1.0 + math.exp(-diff / TEMPERATURE))


def run(pairs, server, cache_dir, **overrides):
    judge = settings(server.base_url, **overrides)
    annotator = Annotator(judge)
    return judge_pairs(pairs, annotator, lambda: JudgeClient(judge, annotator), JudgmentCache(cache_dir),
                       judge.concurrency, desc=None)


def test_judged_win_rate_is_the_mean_of_the_servers_probabilities(pairs, tmp_path):
    with ToyJudgeServer(model=MODEL, temperature=TEMPERATURE) as server:
        judgments = run(pairs, server, tmp_path)
        sent = sum(p.output != p.reference for p in pairs)
        assert server.counts["answered"] == sent  # identical outputs are not sent
    expected = np.array([expected_preference(p) for p in pairs])
    got = np.array([j.preference for j in judgments])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    metrics = judged_metrics(judgments, [p.output for p in pairs], [p.reference for p in pairs], price=1e-5,
                             judge="j", model=MODEL, bootstrap_resamples=200, seed=0)
    assert metrics["win_rate"] == pytest.approx(expected.mean(), abs=1e-12)
    assert metrics["win_rate_se"] == pytest.approx(expected.std(ddof=1) / math.sqrt(len(expected)), abs=1e-12)
    assert metrics["n_judged"] == len(pairs) and metrics["n_ties"] == len(pairs) - sent
    assert metrics["lc_method"] == LC_ONE_MODEL  # not AlpacaEval's 805 prompts


def test_tokens_and_cost_are_the_servers_usage_times_the_price(pairs, tmp_path):
    with ToyJudgeServer(model=MODEL) as server:
        judgments = run(pairs[:30], server, tmp_path)
        billed = server.counts["billed_tokens"]
    metrics = judged_metrics(judgments, [p.output for p in pairs[:30]], [p.reference for p in pairs[:30]],
                             price=10.0 / 1e6, judge="j", model=MODEL, bootstrap_resamples=50, seed=0)
    assert billed > 0 and metrics["judge_tokens"] == billed
    assert metrics["judge_cost_usd"] == pytest.approx(billed * 10.0 / 1e6)
    assert metrics["judge_requests"] == server.counts["answered"] and metrics["judge_cached"] == 0


def test_positions_are_randomised_as_alpaca_eval_does(pairs, tmp_path):
    """About half the time the server sees the model's output first, and exactly where
    alpaca_eval's own RandomSwitchTwoColumnsProcessor would switch the pair."""
    import pandas as pd
    from alpaca_eval.processors import RandomSwitchTwoColumnsProcessor

    with ToyJudgeServer(model=MODEL) as server:
        run(pairs, server, tmp_path)
        seen = list(server.seen)
    sent = [p for p in pairs if p.output != p.reference]
    model_first = {instr: first == dict((p.instruction, p.output) for p in sent)[instr] for instr, first, _ in seen}
    share = sum(model_first.values()) / len(model_first)
    assert 0.35 < share < 0.65, share
    frame = pd.DataFrame([{"instruction": p.instruction, "output_1": p.reference, "output_2": p.output}
                          for p in sent])
    switched = RandomSwitchTwoColumnsProcessor(two_columns_to_switch=["output_1", "output_2"],
                                               random_seed_columns=["instruction"], seed=0,
                                               _switch_column="is_switched_outputs").preprocess(frame)
    assert dict(zip(switched["instruction"], switched["is_switched_outputs"].astype(bool), strict=True)) == model_first


def test_a_rerun_makes_no_requests_and_a_changed_output_or_template_misses(pairs, tmp_path):
    with ToyJudgeServer(model=MODEL) as server:
        first = run(pairs, server, tmp_path)
        sent = server.counts["requests"]
        again = run(pairs, server, tmp_path)
        assert server.counts["requests"] == sent  # all from the cache
        assert [j.preference for j in again] == [j.preference for j in first]
        changed = list(pairs)
        changed[1] = Pair(changed[1].instruction, changed[1].output + " 7", changed[1].reference)
        run(changed, server, tmp_path)
        assert server.counts["requests"] == sent + 1  # only the changed output
        # The same annotator with one more sentence in its template: every pair is judged again.
        import alpaca_eval

        configs = Path(alpaca_eval.__file__).parent / "evaluators_configs"
        mine = tmp_path / "evaluators_configs"
        shutil.copytree(configs / "weighted_alpaca_eval_gpt4_turbo", mine / "weighted_alpaca_eval_gpt4_turbo")
        template = mine / "alpaca_eval_clf_gpt4_turbo" / "alpaca_eval_clf.txt"
        template.parent.mkdir(parents=True)
        template.write_text((configs / "alpaca_eval_clf_gpt4_turbo" / "alpaca_eval_clf.txt").read_text()
                            .replace("## Task", "## Task\n\nBe fair.\n"))
        before = server.counts["requests"]
        run(pairs, server, tmp_path, annotator=str(mine / "weighted_alpaca_eval_gpt4_turbo"))
        assert server.counts["requests"] - before == sum(p.output != p.reference for p in pairs)


def test_requests_run_at_most_concurrency_at_a_time(pairs, tmp_path):
    with ToyJudgeServer(model=MODEL, delay_s=0.05) as server:
        run(pairs[:60], server, tmp_path, concurrency=3)
    assert server.max_in_flight == 3


@pytest.mark.parametrize("status", [429, 503])
def test_rate_limits_and_server_errors_are_retried(pairs, tmp_path, status):
    with ToyJudgeServer(model=MODEL, fail_first=6, fail_status=status) as server:
        judgments = run(pairs[:40], server, tmp_path, concurrency=2, max_retries=5)
        assert server.counts["failed"] == 6
        assert server.counts["answered"] == sum(p.output != p.reference for p in pairs[:40])
    np.testing.assert_allclose([j.preference for j in judgments], [expected_preference(p) for p in pairs[:40]],
                               atol=1e-12)


def test_a_server_that_dies_halfway_leaves_a_resumable_state(pairs, tmp_path):
    sent = sum(p.output != p.reference for p in pairs)
    with ToyJudgeServer(model=MODEL, die_after=40) as server:
        with pytest.raises(JudgingIncomplete, match="run the same command again to resume") as failure:
            run(pairs, server, tmp_path, concurrency=2, max_retries=1, timeout_s=2)
        answered = server.counts["answered"]
    assert answered >= 40
    assert "\n" not in str(failure.value)
    with ToyJudgeServer(model=MODEL) as second:
        judgments = run(pairs, second, tmp_path)
        # Only what the first server did not answer (an answer in flight when it died may be lost).
        assert sent - answered <= second.counts["answered"] <= sent - 40
    np.testing.assert_allclose([j.preference for j in judgments], [expected_preference(p) for p in pairs],
                               atol=1e-12)


def test_alpaca_evals_client_config_spreads_requests_over_its_endpoints(pairs, tmp_path):
    """judge.client_config: alpaca_eval's client-config YAML (keys and base URLs) builds the clients."""
    import yaml

    with ToyJudgeServer(model=MODEL, api_key="key-a") as first, ToyJudgeServer(model=MODEL, api_key="key-b") as second:
        config = {"default": [{"api_key": "key-a", "base_url": first.base_url},
                              {"api_key": "key-b", "base_url": second.base_url}]}
        (tmp_path / "clients.yaml").write_text(yaml.safe_dump(config))
        judgments = run(pairs[:40], first, tmp_path / "cache", client_config=str(tmp_path / "clients.yaml"))
        assert first.counts["answered"] > 0 and second.counts["answered"] > 0  # both endpoints used
        assert first.counts["answered"] + second.counts["answered"] == sum(p.output != p.reference for p in pairs[:40])
    np.testing.assert_allclose([j.preference for j in judgments], [expected_preference(p) for p in pairs[:40]],
                               atol=1e-12)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _check(cfg_judge: dict, cache: Path):
    from omegaconf import OmegaConf

    from ibridge.distributed import DistInfo
    from ibridge.judging.stage import check_judge

    cfg = OmegaConf.create({"judge": {"name": "alpaca_eval", **cfg_judge}, "model": {"cache_dir": str(cache)}})
    check_judge(cfg, DistInfo())


def _judge_cfg(base_url: str, **overrides) -> dict:
    return {"annotator": "weighted_alpaca_eval_gpt4_turbo", "model": MODEL, "base_url": base_url,
            "api_key_env": None, "client_config": None, "concurrency": 2, "max_retries": 1, "timeout_s": 5,
            "price_per_million_tokens": None, "seed": 0, **overrides}


def test_the_endpoint_check_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("IBRIDGE_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(JudgeError, match="IBRIDGE_TEST_JUDGE_KEY: that environment variable is not set"):
        _check(_judge_cfg("http://127.0.0.1:9/v1", api_key_env="IBRIDGE_TEST_JUDGE_KEY"), tmp_path)
    with pytest.raises(JudgeError, match="unreachable") as unreachable:
        _check(_judge_cfg(f"http://127.0.0.1:{_free_port()}/v1"), tmp_path)
    with ToyJudgeServer(model=MODEL, logprobs=False) as server:
        with pytest.raises(JudgeError, match="returned no log-probabilities") as no_logprobs:
            _check(_judge_cfg(server.base_url), tmp_path)
    with ToyJudgeServer(model=MODEL, api_key="right") as server:
        monkeypatch.setenv("IBRIDGE_TEST_JUDGE_KEY", "wrong")
        with pytest.raises(JudgeError, match="rejected the API key"):
            _check(_judge_cfg(server.base_url, api_key_env="IBRIDGE_TEST_JUDGE_KEY"), tmp_path)
        monkeypatch.setenv("IBRIDGE_TEST_JUDGE_KEY", "right")
        with pytest.raises(JudgeError, match="judge.model=another: not served"):
            _check(_judge_cfg(server.base_url, model="another", api_key_env="IBRIDGE_TEST_JUDGE_KEY"), tmp_path)
        _check(_judge_cfg(server.base_url, api_key_env="IBRIDGE_TEST_JUDGE_KEY"), tmp_path)
        requests = server.counts["requests"]
        _check(_judge_cfg(server.base_url, api_key_env="IBRIDGE_TEST_JUDGE_KEY"), tmp_path)
        assert server.counts["requests"] == requests  # the passed check is cached too
    for err in (unreachable.value, no_logprobs.value):
        assert "\n" not in str(err)


def test_bad_judge_settings_are_config_errors():
    from ibridge.config import ConfigError

    for key, value, expected in (("concurrency", 0, "judge.concurrency=0"), ("base_url", "localhost:8000",
                                 "judge.base_url=localhost:8000"), ("price_per_million_tokens", -1, "judge.price")):
        with pytest.raises(ConfigError, match=expected):
            judge_settings({**_judge_cfg("http://127.0.0.1:9/v1"), key: value})


# --------------------------------------------------------------------------- the command line


def _judge_overrides(server) -> list[str]:
    return ["judge=alpaca_eval", f"judge.base_url={server.base_url}", f"judge.model={server.model}",
            "judge.api_key_env=null", "judge.price_per_million_tokens=10", "judge.concurrency=4"]


def test_no_log_probabilities_is_a_one_line_error_before_any_generation(tmp_path, model_cache):
    from tests.conftest import ibridge

    # A model name of its own: a passed endpoint check is cached per URL and model, and a port can come again.
    with ToyJudgeServer(model="toy-judge-without-logprobs", logprobs=False) as server:
        proc = ibridge(["eval", "debug=smoke", "logger=none", "hydra.run.dir=run", *_judge_overrides(server)],
                       tmp_path, model_cache, check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ibridge:")]
    assert len(lines) == 1 and "returned no log-probabilities" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "run" / "eval").exists()  # nothing was generated


def _expected_win_rate(generations: Path) -> float:
    import json

    rows = [json.loads(line) for line in generations.read_text().splitlines()]
    return float(np.mean([expected_preference(Pair(r["prompt"], r["output"], r["reference"])) for r in rows]))


@pytest.mark.slow
def test_the_pipeline_judged_end_to_end_and_never_twice(tmp_path, model_cache):
    """The toy pipeline with judge=alpaca_eval: judged and gold win rates side by side in
    results.json, the terminal table, the cell run and the report; a rerun (also with
    resume=false), an `ibridge eval` of the DPO checkpoint and a report make no request."""
    import json

    from tests.conftest import ibridge
    from tests.wandb_offline import read_runs

    args = ["debug=smoke", "trainer.num_threads=1", "hydra.run.dir=run"]
    with ToyJudgeServer(model=MODEL, temperature=TEMPERATURE) as server:
        proc = ibridge([*args, *_judge_overrides(server)], tmp_path, model_cache)
        requests = server.counts["requests"]
        results = json.loads((tmp_path / "run" / "results.json").read_text())
        dpo = results["eval_by_stage"]["dpo"]
        assert dpo["judge"] == "alpaca_eval/weighted_alpaca_eval_gpt4_turbo" and dpo["judge_model"] == MODEL
        assert dpo["win_rate"] == pytest.approx(_expected_win_rate(tmp_path / "run/eval/dpo/generations.jsonl"),
                                                abs=1e-12)
        for key in ("win_rate_se", "n_judged", "avg_length", "lc_win_rate", "lc_method", "judge_tokens",
                    "judge_cost_usd", "gold_win_rate", "gold_reward"):
            assert dpo.get(key) is not None, key
        assert dpo["judge_cost_usd"] == pytest.approx(dpo["judge_tokens"] * 10 / 1e6)
        assert "judged ± se" in proc.stdout and "gold win" in proc.stdout, proc.stdout[-3000:]
        assert f"{dpo['win_rate']:.3f} ± {dpo['win_rate_se']:.3f}" in proc.stdout, proc.stdout[-3000:]
        judged_section = proc.stdout.split("gold vs AlpacaEval judge")[1].split("run folder")[0]
        assert all(len(line) <= 80 for line in judged_section.splitlines()), judged_section  # 80 columns, none cut
        cell = next(run for run in read_runs(tmp_path / "run") if run.job_type == "cell")
        assert cell.summary["eval/dpo/win_rate"] == pytest.approx(dpo["win_rate"])
        assert cell.summary["eval/dpo/judge_cost_usd"] == pytest.approx(dpo["judge_cost_usd"])
        assert cell.summary["eval/dpo/judge"] == dpo["judge"]

        ibridge([*args, *_judge_overrides(server)], tmp_path, model_cache)  # finished: nothing to do
        ibridge([*args, *_judge_overrides(server), "resume=false"], tmp_path, model_cache)
        again = json.loads((tmp_path / "run" / "results.json").read_text())["eval_by_stage"]["dpo"]
        assert again["judge_requests"] == 0 and again["win_rate"] == dpo["win_rate"]
        ibridge(["eval", "debug=smoke", "trainer.num_threads=1", "hydra.run.dir=again", "logger=none",
                 f"checkpoint={tmp_path / 'run/dpo/checkpoint'}", f"reference={tmp_path / 'run/sft/checkpoint'}",
                 *_judge_overrides(server)], tmp_path, model_cache)
        evaluated = json.loads((tmp_path / "again" / "results.json").read_text())["eval"]
        assert evaluated["win_rate"] == dpo["win_rate"] and evaluated["judge_cached"] == dpo["n_judged"] - dpo[
            "n_ties"]
        ibridge(["report", f"report.path={tmp_path}", "logger=none"], tmp_path, model_cache)
        assert server.counts["requests"] == requests  # none of the four asked the judge again
    markdown = (tmp_path / "report.md").read_text()
    assert "| DPO win | SFT gold win | DPO gold win |" in markdown and "AlpacaEval judge" in markdown


# --------------------------------------------------------------------------- eval_set=alpaca_eval and its LC win rate


def test_eval_set_reads_alpaca_evals_own_format(tmp_path):
    import json

    from ibridge.data import DataError, source_for
    from ibridge.judging.alpaca_data import with_eval_set
    from ibridge.judging.stage import scoring_judge

    rows = [{"dataset": "helpful_base", "instruction": f"Question {i}?", "output": f"Answer {i}.",
             "generator": "gpt4_1106_preview"} for i in range(3)]
    (tmp_path / "alpaca_eval.json").write_text(json.dumps(rows))
    toy = source_for({"kind": "toy", "world": {"seed": 0}})
    source = with_eval_set(toy, {"name": "alpaca_eval", "path": str(tmp_path / "alpaca_eval.json")})
    examples = source.examples("eval")
    assert [(e["prompt"], e["reference"], e["alpaca_index"], e["reference_generator"]) for e in examples] == [
        (f"Question {i}?", f"Answer {i}.", i, "gpt4_1106_preview") for i in range(3)]
    assert len(source.examples("demonstrations")) == len(toy.examples("demonstrations"))  # training data unchanged
    assert scoring_judge({"name": "alpaca_eval"}, source) == {"name": "none"}  # no gold judge for these prompts
    assert scoring_judge({"name": "alpaca_eval"}, toy) == {"name": "gold"}
    assert with_eval_set(toy, {"name": "none"}) is toy
    with pytest.raises(DataError, match="eval_set.path=.*: no such file"):
        with_eval_set(toy, {"name": "alpaca_eval", "path": str(tmp_path / "missing.json")})


def _fake_hub_file(cache: Path, name: str, frame) -> None:
    """`name` in a hub-cache snapshot of tatsu-lab/alpaca_eval, as huggingface_hub lays one out offline."""
    commit = "0" * 40
    root = cache / "datasets--tatsu-lab--alpaca_eval"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    (root / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    frame.to_csv(root / "snapshots" / commit / name, index=False)


def _length_biased(rng, n=805):
    """Judgments of a model whose outputs are as long as the reference or longer, by varying amounts,
    under a judge that prefers longer outputs and nothing else."""
    from ibridge.judging.runner import Judgment

    extra = rng.integers(0, 400, size=n)
    outputs = ["w " * (200 + int(k)) for k in extra]
    references = ["w " * 200 for _ in range(n)]
    delta = np.array([len(o) - len(r) for o, r in zip(outputs, references, strict=True)], dtype=float)
    prefs = 1 / (1 + np.exp(-2.0 * np.tanh(delta / delta.std())))
    return [Judgment(float(p), bool(i % 2), "request") for i, p in enumerate(prefs)], outputs, references


def test_lc_win_rate_is_alpaca_evals_glm_on_its_805_prompts(tmp_path, monkeypatch):
    """With AlpacaEval's data at hand (here a stand-in df_gamed.csv in an offline hub cache), the
    LC win rate is alpaca_eval's GLM, which removes a pure length preference: a raw win rate
    well above 0.5 comes back to about 0.5."""
    import pandas as pd

    from ibridge.judging.names import LC_GLM

    rng = np.random.default_rng(0)
    difficulty = rng.normal(size=805)
    # The gamed baselines (verbose and concise prompting of the reference model) under the same length bias:
    # in alpaca_eval's frame std_delta_len is len(output_1) - len(output_2), and preference P(output_2 better).
    shifts = [(m, i, rng.normal() + s) for m, s in (("long", 2.0), ("short", -2.0)) for i in range(805)]
    gamed = pd.DataFrame([{"model": m, "index": i, "preference": 1 / (1 + np.exp(2.0 * np.tanh(d))),
                           "std_delta_len": d, "instruction_difficulty": difficulty[i], "not_gamed_baseline": False}
                          for m, i, d in shifts])
    _fake_hub_file(tmp_path / "hub", "df_gamed.csv", gamed)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    judgments, outputs, references = _length_biased(rng)
    metrics = judged_metrics(judgments, outputs, references, price=None, judge="weighted_alpaca_eval_gpt4_turbo",
                             model=MODEL, bootstrap_resamples=50, seed=0, alpaca_indices=list(range(805)))
    assert metrics["lc_method"] == LC_GLM
    assert metrics["win_rate"] > 0.6
    assert abs(metrics["lc_win_rate"] - 0.5) < 0.05, metrics["lc_win_rate"]
    assert metrics["judge_cost_usd"] is None  # no price given and the model is not one alpaca_eval knows


def test_lc_win_rate_falls_back_to_ibridges_fit_labelled(tmp_path, monkeypatch):
    """Fewer than 805 prompts, or AlpacaEval's GLM data out of reach: ibridge's one-model fit, labelled."""
    from ibridge.evaluation.stats import length_controlled_win_rate

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    judgments, outputs, references = _length_biased(np.random.default_rng(1))
    for n, indices in ((805, list(range(805))), (100, list(range(100)))):
        metrics = judged_metrics(judgments[:n], outputs[:n], references[:n], price=None, judge="j", model=MODEL,
                                 bootstrap_resamples=50, seed=0, alpaca_indices=indices)
        assert metrics["lc_method"] == LC_ONE_MODEL
        assert metrics["lc_win_rate"] == pytest.approx(length_controlled_win_rate(
            [j.preference for j in judgments[:n]], [len(o.split()) for o in outputs[:n]],
            [len(r.split()) for r in references[:n]]))


# --------------------------------------------------------------------------- cell run and dashboard


def test_cell_run_and_dashboard_carry_the_judged_numbers(tmp_path):
    import json

    from ibridge.cell import cell_summary
    from ibridge.dashboard.spec import (
        JUDGED_COLUMNS,
        Sweep,
        build_report,
        build_workspace,
        report_payload,
        workspace_from_payload,
        workspace_payload,
    )
    from ibridge.jobs.dashboard import judged_sweep

    dpo = {"win_rate": 0.6, "win_rate_ci": [0.5, 0.7], "win_rate_se": 0.05, "lc_win_rate": 0.55,
           "lc_method": LC_ONE_MODEL, "n_judged": 10, "gold_win_rate": 0.4, "gold_reward": 0.3, "judge_tokens": 1234,
           "judge_cost_usd": 0.01234, "judge": "alpaca_eval/weighted_alpaca_eval_gpt4_turbo", "judge_model": MODEL}
    summary = cell_summary({"eval_by_stage": {"dpo": dpo}}, "completed")
    for key in ("win_rate_se", "lc_win_rate", "n_judged", "gold_win_rate", "judge_tokens", "judge_cost_usd"):
        assert summary[f"eval/dpo/{key}"] == dpo[key], key
    assert summary["eval/dpo/judge"] == dpo["judge"] and summary["eval/dpo/lc_method"] == LC_ONE_MODEL

    (tmp_path / "0_cell").mkdir()
    (tmp_path / "0_cell" / "results.json").write_text(json.dumps({"eval_by_stage": {"dpo": dpo}}))
    assert judged_sweep(tmp_path)
    (tmp_path / "0_cell" / "results.json").write_text(json.dumps({"eval_by_stage": {"dpo": {"win_rate": 0.6}}}))
    assert not judged_sweep(tmp_path)
    sweep = Sweep(group="sweep-x", axes=["objective", "lr"], judged=True)
    workspace = build_workspace(sweep)
    payload = workspace_payload(workspace)
    assert workspace_payload(workspace_from_payload(json.loads(json.dumps(payload)))) == payload
    spec = json.dumps(payload["spec"])
    for key in JUDGED_COLUMNS:  # pinned as columns of the cell runs
        assert key in spec, key
    assert "AlpacaEval judge" in spec and "eval/dpo/gold_win_rate" in json.dumps(report_payload(build_report(sweep)))
    assert "AlpacaEval judge" not in json.dumps(workspace_payload(build_workspace(Sweep("sweep-x", ["objective"]))))
