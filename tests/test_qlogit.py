"""Logits as a Q-function (docs/design.md §1): the identities by hand and on a tiny Llama, the
first-error AUROC convention, and the `qlogit` job end to end on tiny saved models."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ibridge.analysis.qlogit import (
    OFFSET_INVARIANT,
    check_identities,
    first_error_auroc,
    first_error_targets,
    position_matched_auroc,
    position_only_auroc,
    q_values,
)
from ibridge.data.collate import pad_sequences
from ibridge.data.formatting import encode_split
from ibridge.objectives.logprobs import token_logps

WORLD = {"n_demonstrations": 128, "n_preference_prompts": 128, "n_heldout_pairs": 32, "n_eval": 32, "n_corpus": 256}
BETA = 0.1


def tiny_llama(seed: int, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger logits than the default init, so Q and V are far from 0
        model.lm_head.weight.mul_(100.0)
    return model


@pytest.fixture(scope="module")
def toy():
    from ibridge.data import source_for
    from ibridge.world import build_tokenizer

    source = source_for({"kind": "toy", "world": WORLD})
    tokenizer = build_tokenizer(source.world_config)
    return source, tokenizer


@pytest.fixture(scope="module")
def models(toy):
    _, tokenizer = toy
    return tiny_llama(1, len(tokenizer)), tiny_llama(2, len(tokenizer))


# --------------------------------------------------------------------------- by hand


def test_one_token_by_hand():
    """Q - V = beta * log pi/pi_ref for one action; r_t = Q (V = 0 after EOS); both identities."""
    l_pi = [2.0, -1.0, 0.5]
    l_ref = [0.0, 1.0, 3.0]
    action = 1
    policy = torch.tensor([[l_pi, [0.0, 0.0, 0.0]]])  # (1, 2, 3): position 0's logits predict token 1
    reference = torch.tensor([[l_ref, [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[-100, action]])
    vals = q_values(policy, reference, labels, BETA)

    def lse(row):
        return math.log(sum(math.exp(x) for x in row))

    q = BETA * (l_pi[action] - l_ref[action])
    v = BETA * (lse(l_pi) - lse(l_ref))
    log_ratio = (l_pi[action] - lse(l_pi)) - (l_ref[action] - lse(l_ref))
    assert vals["mask"].tolist() == [[True]]
    assert vals["q"][0, 0].item() == pytest.approx(q, abs=1e-12)
    assert vals["v"][0, 0].item() == pytest.approx(v, abs=1e-12)
    assert (vals["q"] - vals["v"])[0, 0].item() == pytest.approx(BETA * log_ratio, abs=1e-12)
    assert vals["token_reward"][0, 0].item() == pytest.approx(BETA * log_ratio, abs=1e-12)
    assert vals["r_t"][0, 0].item() == pytest.approx(q, abs=1e-12)  # V(after EOS) = 0
    assert vals["v_start"][0].item() == pytest.approx(v, abs=1e-12)
    assert vals["q"].dtype == torch.float64
    token_err, seq_err = check_identities(vals)
    assert token_err < 1e-14 and seq_err < 1e-14


def test_r_t_telescopes_and_shift_changes_q_not_reward():
    """r_t uses the next state's V; adding c(s) to every logit of a state moves Q and V by
    beta * c(s) but leaves the per-token implicit reward alone (raw logits, not log-probs)."""
    torch.manual_seed(0)
    policy = torch.randn(2, 6, 5, dtype=torch.float64)
    reference = torch.randn(2, 6, 5, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 1, 4, 2], [-100, 0, 2, 2, -100, -100]])
    vals = q_values(policy, reference, labels, BETA)
    assert vals["mask"].tolist() == [[False, True, True, True, True], [True, True, True, False, False]]
    # r_t = Q_t - V_{t+1} inside the response, Q_T at its last token
    assert torch.allclose(vals["r_t"][0, 1:4], vals["q"][0, 1:4] - vals["v"][0, 2:5])
    assert vals["r_t"][0, 4] == vals["q"][0, 4]
    assert vals["r_t"][1, 2] == vals["q"][1, 2]
    assert vals["v_start"].tolist() == [vals["v"][0, 1].item(), vals["v"][1, 0].item()]

    shift = torch.randn(2, 6, 1, dtype=torch.float64)
    moved = q_values(policy + shift, reference, labels, BETA)
    mask = vals["mask"]
    expected = BETA * shift[:, :-1, 0]
    assert torch.allclose((moved["q"] - vals["q"])[mask], expected[mask])
    assert torch.allclose((moved["v"] - vals["v"])[mask], expected[mask])
    assert torch.allclose(moved["token_reward"], vals["token_reward"], atol=1e-12)
    assert max(check_identities(moved)) < 1e-12


def test_several_response_segments():
    """Two assistant turns in one row: V = 0 after each; identity 2 sums V over segment starts."""
    torch.manual_seed(1)
    policy, reference = torch.randn(1, 8, 4), torch.randn(1, 8, 4)
    labels = torch.tensor([[-100, 1, 2, -100, -100, 3, 0, -100]])
    vals = q_values(policy, reference, labels, BETA)
    assert vals["v_next"][0, 1] == 0.0  # after the first turn's last token
    assert vals["v_start"][0].item() == pytest.approx((vals["v"][0, 0] + vals["v"][0, 4]).item())
    assert max(check_identities(vals)) < 1e-12


def test_rejects_mismatched_vocabularies():
    with pytest.raises(ValueError, match="tokenizer"):
        q_values(torch.zeros(1, 3, 5), torch.zeros(1, 3, 6), torch.tensor([[-100, 1, 2]]), BETA)


# --------------------------------------------------------------------------- tiny Llama


def test_identities_on_tiny_llama(toy, models):
    source, tokenizer = toy
    policy, reference = models
    pairs, _ = encode_split(tokenizer, source.examples("heldout_pairs")[:8], "preferences", 48)
    sequences = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    batch = pad_sequences(sequences, tokenizer.pad_token_id)
    with torch.no_grad():
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        l_pi, l_ref = policy(**kwargs).logits, reference(**kwargs).logits  # float32
    assert l_pi.dtype == torch.float32

    vals = q_values(l_pi, l_ref, batch["labels"], BETA)  # float64 arithmetic
    token_err, seq_err = check_identities(vals)
    assert token_err < 1e-10 and seq_err < 1e-10, (token_err, seq_err)
    vals32 = q_values(l_pi, l_ref, batch["labels"], BETA, dtype=torch.float32)
    token_err32, seq_err32 = check_identities(vals32)
    assert token_err32 < 1e-5 and seq_err32 < 1e-5, (token_err32, seq_err32)

    # Not trivially zero: the random models disagree, and the implicit reward is the one the
    # training code computes (token_logps in float32).
    mask = vals["mask"]
    assert vals["q"][mask].abs().max() > 0.1 and vals["v"][mask].abs().max() > 0.1
    logp_pi, _ = token_logps(l_pi, batch["labels"])
    logp_ref, _ = token_logps(l_ref, batch["labels"])
    assert torch.allclose(vals["token_reward"].float(), BETA * (logp_pi - logp_ref), atol=1e-5)
    # Identity 2 is informative: sum r_t differs from r(x, y) by exactly V(s_0), which is not 0.
    assert (vals["r_sum"] - vals["reward"]).abs().min() > 1e-3


# --------------------------------------------------------------------------- AUROC convention


def test_first_error_auroc_convention():
    assert first_error_targets(4, 2).tolist() == [0.0, 0.0, 1.0]
    assert first_error_targets(4, None) is None
    assert first_error_targets(4, 4) is None  # beyond the tokens (e.g. truncated)
    # the reward drops exactly at the first error -> 1.0; rises there -> 0.0
    drops = [[0.5, 0.4, -1.0, 9.0], [0.2, -0.3, 7.0]]
    assert first_error_auroc(drops, [2, 1]) == (1.0, 2, 3)
    rises = [[-r for r in rewards] for rewards in drops]
    assert first_error_auroc(rises, [2, 1])[0] == 0.0
    # responses without an error or with their error at token 0 only: undefined
    assert first_error_auroc([[0.1, 0.2]], [None]) == (None, 0, 0)
    assert first_error_auroc([[0.1, 0.2]], [0]) == (None, 1, 0)


def test_position_matched_auroc_is_not_inflated_by_position():
    """A reward that only falls along the response (no knowledge of errors) gets a pooled
    first-error AUROC far above chance, exactly that of position alone; compared at equal
    positions it is chance."""
    first_errors = [0, 1, 2, 3, 3, None, 2]
    lengths = [4, 4, 5, 6, 4, 3, 3]
    drifting = [[-float(j) for j in range(n)] for n in lengths]
    # pooled by hand: positives at 0, 1, 2, 2, 3, 3; negatives (tokens before each error) 5 at 0,
    # 4 at 1, 2 at 2; pairs a positive wins, ties half: 0.5*5 + (5 + 0.5*4) + 2*(9 + 0.5*2) + 2*11
    pooled = (2.5 + 7.0 + 20.0 + 22.0) / (6 * 11)
    assert first_error_auroc(drifting, first_errors)[0] == pytest.approx(pooled)
    assert position_only_auroc(lengths, first_errors) == pytest.approx(pooled) and pooled > 0.75
    matched, n_pairs = position_matched_auroc(drifting, first_errors)
    assert matched == 0.5
    # same-position pairs by hand: position j pairs responses erring at j with those erring later
    # (errors at 0, 1, 2, 3, 3, 2): j=0: 1 x 5, j=1: 1 x 4, j=2: 2 x 2, j=3: none later
    assert n_pairs == 5 + 4 + 4
    # a reward that drops exactly at the first error is perfect either way
    dropping = [[0.0] * n for n in lengths]
    for rewards, first_error in zip(dropping, first_errors, strict=True):
        if first_error is not None:
            rewards[first_error] = -1.0
    assert position_matched_auroc(dropping, first_errors) == (1.0, 13)
    # one stratum by hand: position 2 holds positives {r=-1 (resp 2), r=-1 (resp 6)} and negatives
    # {resp 3, resp 4}; rewards there -0.5 / 0.3 (pos), 0.3 / 0.1 (neg): pairs won 1 + 1 + 0.5 + 0 = 2.5 of 4
    rewards = [[9.0], [9.0, 9.0], [9.0, 9.0, -0.5], [9.0, 9.0, 0.3, 9.0], [9.0, 9.0, 0.1, 9.0], [], [9.0, 9.0, 0.3]]
    only_two = [None, None, 2, 3, 3, None, 2]
    assert position_matched_auroc(rewards, only_two) == (2.5 / 4, 4)
    assert position_matched_auroc([[0.1, 0.2]], [None]) == (None, 0)


# --------------------------------------------------------------------------- the job


def run_job(run_dir: Path, policy_dir: Path, reference_dir: Path | None):
    from ibridge.data import source_for
    from ibridge.jobs import qlogit
    from ibridge.jobs.context import RunContext
    from ibridge.runtime import resolve_runtime
    from ibridge.tracking import RunLogger

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.create({
        "seed": 0, "checkpoint": str(policy_dir), "reference": None if reference_dir is None else str(reference_dir),
        "model": {"kind": "toy", "max_length": 48}, "data": {"kind": "toy", "world": WORLD},
        "qlogit": {"beta": BETA, "num_pairs": -1, "num_figure_pairs": 4},
    })
    ctx = RunContext(
        cfg=cfg, run_dir=run_dir, runtime=resolve_runtime({"device": "cpu", "precision": "fp32"}),
        logger=RunLogger(run_dir, {"backend": "none"}, {}, "g"), source=source_for(cfg.data),
    )
    qlogit.run(ctx)
    return ctx


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, toy, models) -> dict[str, Path]:
    _, tokenizer = toy
    tmp = tmp_path_factory.mktemp("models")
    paths = {}
    for name, model in zip(("policy", "reference"), models, strict=True):
        paths[name] = tmp / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="module")
def job_run(tmp_path_factory, saved_models):
    tmp = tmp_path_factory.mktemp("qlogit")
    # QLOGIT_FIGURES=/tmp/somewhere keeps the run (and its figures) for a look.
    run_dir = Path(os.environ["QLOGIT_FIGURES"]) if os.environ.get("QLOGIT_FIGURES") else tmp / "run"
    return run_job(run_dir, saved_models["policy"], saved_models["reference"])


def test_job_results(job_run):
    results = job_run.results["qlogit"]
    for key in ("identity_max_abs_error_token", "identity_max_abs_error_sequence", "auroc_token_reward",
                "auroc_r_t", "implicit_reward_acc", "spearman_reward_gold", "num_pairs"):
        assert key in results, key
    assert results["identity_max_abs_error_token"] < 1e-9
    assert results["identity_max_abs_error_sequence"] < 1e-9
    assert results["num_pairs"] == len(job_run.source.examples("heldout_pairs"))
    for key in ("auroc_token_reward", "auroc_r_t", "implicit_reward_acc"):
        assert 0.0 <= results[key] <= 1.0, key
    assert -1.0 <= results["spearman_reward_gold"] <= 1.0
    for key in ("auroc_position_only", "auroc_token_reward_position_matched", "auroc_r_t_position_matched"):
        assert 0.0 <= results[key] <= 1.0, key
    assert results["num_position_matched_pairs"] > 0
    assert results["reference_from"] == "reference=" and results["reference"] == job_run.cfg.reference
    json.dumps(results, allow_nan=False)  # strict JSON: undefined values are None, not NaN

    logged = [json.loads(line) for line in (job_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["stage"] == "qlogit"
    assert logged[-1]["qlogit/implicit_reward_acc"] == results["implicit_reward_acc"]


def test_job_tokens_jsonl(job_run):
    lines = (job_run.run_dir / "qlogit" / "tokens.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 2 * job_run.results["qlogit"]["num_pairs"]
    assert {r["kind"] for r in records} == {"chosen", "rejected"}
    for record in records:
        n = len(record["tokens"])
        assert n == len(record["response"].split()) + 1 and record["tokens"][-1] == "<eos>"
        for key in ("token_reward", "q", "v", "r_t"):
            assert len(record[key]) == n, key
        assert record["sum_r_t"] == pytest.approx(record["sequence_reward"] + record["v_start"], abs=1e-9)
        assert 0.0 <= record["gold_reward"] <= 1.0
        assert record["first_error_token"] == record["first_error"]


def test_job_figures(job_run):
    folder = job_run.run_dir / "qlogit"
    for name in ("token_heatmap", "reward_distribution", "q_v_positions"):
        path = folder / f"{name}.png"
        assert path.is_file(), name
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, (name, len(data))


def test_job_with_policy_equal_to_reference(tmp_path, saved_models):
    """Everything is 0: chance-level AUROC and accuracy, no Spearman, figures still drawn."""
    ctx = run_job(tmp_path / "run", saved_models["policy"], saved_models["policy"])
    results = ctx.results["qlogit"]
    assert results["identity_max_abs_error_token"] == 0.0
    assert results["identity_max_abs_error_sequence"] == 0.0
    assert results["auroc_token_reward"] == 0.5 and results["implicit_reward_acc"] == 0.5
    assert results["spearman_reward_gold"] is None
    assert all((tmp_path / "run" / "qlogit" / f"{name}.png").stat().st_size > 0
               for name in ("token_heatmap", "reward_distribution", "q_v_positions"))


def test_default_reference_is_the_one_the_stage_was_trained_against(tmp_path, saved_models, job_run):
    """reference=null for a stage's checkpoint: the reference in its stage.json (for a DPO stage
    the SFT model), not the base model; the results are those of passing it explicitly."""
    import shutil

    stage = tmp_path / "out" / "dpo"
    shutil.copytree(saved_models["policy"], stage / "checkpoint")
    (stage / "stage.json").write_text(json.dumps({
        "objective": "dpo", "init": str(saved_models["reference"]), "reference": str(saved_models["reference"]),
        "checkpoint": str(stage / "checkpoint")}))
    results = run_job(tmp_path / "run", stage / "checkpoint", None).results["qlogit"]
    assert results["reference"] == str(saved_models["reference"])
    assert results["reference_from"].startswith("stage record")
    explicit = job_run.results["qlogit"]
    for key in ("implicit_reward_acc", "auroc_token_reward", "mean_reward_chosen", "spearman_reward_gold"):
        assert results[key] == explicit[key], key

    (stage / "stage.json").write_text(json.dumps({"reference": str(tmp_path / "moved")}))
    with pytest.raises(FileNotFoundError, match="stage.json: its reference .*moved does not exist"):
        run_job(tmp_path / "run2", stage / "checkpoint", None)


class _Offset(torch.nn.Module):
    """A causal LM whose logits at each state get a state-dependent constant added: the same
    policy (probabilities), different logits."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, **kwargs):
        from types import SimpleNamespace

        logits = self.model(input_ids=input_ids, **kwargs).logits  # (B, T, V)
        state = torch.cumsum(input_ids.double() * 0.37, dim=1)  # (B, T): depends on the prefix only
        return SimpleNamespace(logits=logits + (30.0 * torch.sin(state)).unsqueeze(-1).to(logits.dtype))


def test_metrics_declared_offset_invariant_are(toy, models):
    """Adding c(s) to every logit of each state changes exactly the metrics left out of
    OFFSET_INVARIANT (auroc_r_t here), not those in it."""
    from types import SimpleNamespace

    from ibridge.jobs import qlogit

    source, tokenizer = toy
    policy, reference = models
    pairs = qlogit._encode_pairs(SimpleNamespace(source=source), tokenizer, 32, 48)
    sequences = [pair[kind] for kind in qlogit.KINDS for pair in pairs]

    def metrics(model):
        values, err_token, err_sequence = qlogit.analyse(
            model, reference, [s["encoded"] for s in sequences], BETA, torch.device("cpu"), tokenizer.pad_token_id)
        records = [qlogit._record(seq, vals, tokenizer) for seq, vals in zip(sequences, values, strict=True)]
        return qlogit.summarise(records, len(pairs), err_token, err_sequence, BETA)

    plain, shifted = metrics(policy), metrics(_Offset(policy))
    for key in OFFSET_INVARIANT:
        assert shifted[key] == pytest.approx(plain[key], abs=1e-6), key
    assert plain["auroc_r_t"] is not None and abs(shifted["auroc_r_t"] - plain["auroc_r_t"]) > 0.01
