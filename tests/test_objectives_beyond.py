"""Objectives beside the paper's (docs/objectives.md): dft, prior_leaning, sft_kl, asft and the
chunked vocabulary KL they anchor with. Hand-computed values, properties of the maths, and
the training step's wiring of the reference model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ibridge.data.collate import collate_demonstrations
from ibridge.objectives import build_objective, token_logps, vocab_kl
from ibridge.objectives import vocab_divergence as vocab_kl_module
from ibridge.stages import demonstration_step
from tests.conftest import ibridge
from tests.weighting_case import PAD, examples, tiny_model

LN2 = math.log(2.0)


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


# A batch of one sequence, three scored positions of which the last is masked:
# p_t = 0.5, 0.25 (scored), 0.8 (masked); pi_ref at the tokens 0.25, 0.125.
P = [0.5, 0.25, 0.8]
MASK = torch.tensor([[True, True, False]])
REF = torch.log(torch.tensor([[0.25, 0.125, 0.3]]))


def _policy() -> torch.Tensor:
    return torch.log(torch.tensor([P])).requires_grad_(True)


def test_dft_hand_case():
    logps = _policy()
    out = build_objective({"name": "dft"})(logps, REF, MASK)
    # mean of -p log p over the scored tokens: (0.5 ln 2 + 0.25 ln 4) / 2 = 0.5 ln 2
    assert out.loss.item() == pytest.approx(0.5 * LN2, abs=1e-7)
    out.loss.backward()
    # d/d log p of -sg(p) log p is -p, over 2 tokens; nothing reaches the masked one
    assert logps.grad[0].tolist() == pytest.approx([-0.25, -0.125, 0.0], abs=1e-7)
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["implicit/weight"] == pytest.approx(0.375)  # mean p_t: DFT's weight relative to SFT
    assert m["implicit/token_reward"] == pytest.approx(LN2, abs=1e-6)  # log(0.5/0.25), log(0.25/0.125)
    assert m["implicit/reward"] == pytest.approx(2 * LN2, abs=1e-6)  # beta = 1: no anchor to scale by
    assert m["train/nll_per_token"] == pytest.approx(1.5 * LN2, abs=1e-6)
    assert m["logps/policy"] == pytest.approx(math.log(0.5 * 0.25), abs=1e-6)
    assert m["logps/ref"] == pytest.approx(math.log(0.25 * 0.125), abs=1e-6)


@pytest.mark.parametrize("alpha,loss,grad", [
    (2.0, ((1 - 0.25) / 2 + (1 - 0.0625) / 2) / 2, [-0.25 / 2, -0.0625 / 2]),  # -p^alpha / n
    (1.0, ((1 - 0.5) + (1 - 0.25)) / 2, [-0.5 / 2, -0.25 / 2]),  # 1 - p
    (0.5, ((1 - 0.5**0.5) / 0.5 + (1 - 0.25**0.5) / 0.5) / 2, [-(0.5**0.5) / 2, -(0.25**0.5) / 2]),
    (0.0, 1.5 * LN2, [-0.5, -0.5]),  # NLL
])
def test_prior_leaning_hand_cases(alpha, loss, grad):
    logps = _policy()
    out = build_objective({"name": "prior_leaning", "alpha": alpha})(logps, REF, MASK)
    assert out.loss.item() == pytest.approx(loss, abs=1e-7)
    out.loss.backward()
    assert logps.grad[0, :2].tolist() == pytest.approx(grad, abs=1e-7)
    assert logps.grad[0, 2].item() == 0.0
    assert out.metrics["implicit/weight"].item() == pytest.approx((0.5**alpha + 0.25**alpha) / 2)


def test_prior_leaning_tends_to_nll_and_at_one_has_dfts_gradient():
    torch.manual_seed(0)
    logps = torch.log_softmax(torch.randn(3, 6, 9), -1)[..., 0].detach()  # (3, 6) valid log-probs
    mask = torch.rand(3, 6) > 0.3
    ref = logps - 0.1
    sft = build_objective({"name": "sft"})(logps, None, mask).loss
    tiny = build_objective({"name": "prior_leaning", "alpha": 1e-7})(logps, ref, mask).loss
    assert tiny.item() == pytest.approx(sft.item(), rel=1e-6)  # (1 - p^a)/a -> -log p, no cancellation

    def grad(cfg):
        x = logps.clone().requires_grad_(True)
        build_objective(cfg)(x, ref, mask).loss.backward()
        return x.grad

    # sg(p) ∇log p = ∇p: DFT and the -p objective differ in loss, not in gradient
    torch.testing.assert_close(grad({"name": "dft"}), grad({"name": "prior_leaning", "alpha": 1.0}))


# --------------------------------------------------------------------------------------------
# The vocabulary KL

# Policy and reference next-token distributions at three positions of one sequence (V = 3).
PI = [[0.7, 0.2, 0.1], [0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]
PI_REF = [[0.2, 0.3, 0.5], [0.5, 0.25, 0.25], [0.6, 0.3, 0.1]]
LABELS = torch.tensor([[-100, 0, 1]])  # position 0 predicts token 0, position 1 token 1; 2 predicts nothing


def _logits(rows) -> torch.Tensor:
    return torch.log(torch.tensor([rows], dtype=torch.float32))  # (1, 3, 3), softmax = rows


def test_vocab_kl_hand_case_both_directions_and_gradients():
    where = torch.tensor([[True, False, True]])
    for direction, first in (("policy_ref", _kl(PI[0], PI_REF[0])), ("ref_policy", _kl(PI_REF[0], PI[0]))):
        logits = _logits(PI).requires_grad_(True)
        kl = vocab_kl(logits, _logits(PI_REF), where, direction)
        assert kl.shape == (1, 3) and kl.dtype == torch.float32
        assert kl[0, 0].item() == pytest.approx(first, abs=1e-6)
        assert kl[0, 1].item() == 0.0  # not selected
        assert kl[0, 2].item() == pytest.approx(_kl(*((PI[2], PI_REF[2]) if direction == "policy_ref"
                                                       else (PI_REF[2], PI[2]))), abs=1e-6)
        kl[0, 0].backward()
        p, q = PI[0], PI_REF[0]
        if direction == "policy_ref":  # p_j (log p_j/q_j - KL)
            expected = [a * (math.log(a / b) - first) for a, b in zip(p, q, strict=True)]
        else:  # p_j - q_j
            expected = [a - b for a, b in zip(p, q, strict=True)]
        assert logits.grad[0, 0].tolist() == pytest.approx(expected, abs=1e-6)
        assert logits.grad[0, 1:].abs().max().item() == 0.0
    assert _kl(PI[0], PI_REF[0]) == pytest.approx(0.634897, abs=1e-6)  # the two directions differ
    assert _kl(PI_REF[0], PI[0]) == pytest.approx(0.675806, abs=1e-6)


def _independent_kl(logits, ref_logits, where, direction):
    # the textbook float64 formula over whole tensors, autograd for the gradient
    logp = F.log_softmax(logits.double(), -1)
    logq = F.log_softmax(ref_logits.double(), -1)
    if direction == "policy_ref":
        kl = (logp.exp() * (logp - logq)).sum(-1)
    else:
        kl = (logq.exp() * (logq - logp)).sum(-1)
    return torch.where(where, kl, torch.zeros_like(kl))


@pytest.mark.parametrize("direction", ["policy_ref", "ref_policy"])
@pytest.mark.parametrize("chunk", [None, 7 * 3])  # None: one chunk; 21 elements: 3 rows per chunk
def test_vocab_kl_matches_the_textbook_formula_in_chunks(direction, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(vocab_kl_module, "_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 5, 7)).requires_grad_(True)
    ref = 3 * torch.randn(2, 5, 7)
    where = torch.rand(2, 5) > 0.4
    weights = torch.randn(2, 5)
    (vocab_kl(logits, ref, where, direction) * weights).sum().backward()
    mine = logits.grad.clone()
    logits.grad = None
    expected = _independent_kl(logits, ref, where, direction)
    (expected * weights.double()).sum().backward()
    torch.testing.assert_close(vocab_kl(logits, ref, where, direction).double(), expected.detach(),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine, logits.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("direction", ["policy_ref", "ref_policy"])
def test_vocab_kl_gradcheck_float64(direction):
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(2, 3, 4, dtype=torch.float64)
    where = torch.tensor([[True, False, True], [True, True, False]])
    assert torch.autograd.gradcheck(lambda x: vocab_kl(x, ref, where, direction), (logits,))


def test_vocab_kl_keeps_no_float32_copy_of_the_logits():
    # bf16 logits of 2 x 8 positions, 5 of them scored: what autograd keeps for the backward
    # pass is the policy logits themselves (alive anyway), the reference's 5 scored rows in
    # bf16, and (N,) vectors; no (rows, V) float32 log-softmax of either model.
    torch.manual_seed(0)
    vocab = 64
    logits = torch.randn(2, 8, vocab).to(torch.bfloat16).requires_grad_(True)
    ref = torch.randn(2, 8, vocab).to(torch.bfloat16)
    where = torch.zeros(2, 8, dtype=torch.bool)
    where[0, :3] = where[1, 4:6] = True
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kl = vocab_kl(logits, ref, where)
    big = [t for t in saved if t.numel() >= vocab]
    assert all(t.dtype == torch.bfloat16 for t in big), [(t.dtype, tuple(t.shape)) for t in big]
    assert sorted(t.numel() for t in big) == [5 * vocab, 2 * 8 * vocab]  # reference rows, policy logits
    assert any(t.data_ptr() == logits.data_ptr() for t in big)  # the logits themselves, not a copy
    kl.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and logits.grad[0, 3:].abs().max().item() == 0.0


# --------------------------------------------------------------------------------------------
# sft_kl and asft


@pytest.mark.parametrize("name,token_loss", [
    ("sft_kl", lambda p: -math.log(p)),
    ("asft", lambda p: -p * math.log(p)),
])
@pytest.mark.parametrize("direction", ["policy_ref", "ref_policy"])
def test_anchored_hand_case(name, token_loss, direction):
    logits = _logits(PI).requires_grad_(True)
    logps, mask = token_logps(logits, LABELS)  # p = 0.7 (position 0), 0.25 (position 1)
    ref_logps, _ = token_logps(_logits(PI_REF), LABELS)
    objective = build_objective({"name": name, "kl_coef": 0.5, "kl_direction": direction})
    out = objective(logps, ref_logps, mask, logits=logits, ref_logits=_logits(PI_REF))
    # position 0: KL between PI[0] and PI_REF[0]; position 1: equal rows, KL 0; position 2's
    # rows differ but predict no scored token, so they do not count.
    kl0 = _kl(PI[0], PI_REF[0]) if direction == "policy_ref" else _kl(PI_REF[0], PI[0])
    expected = (token_loss(0.7) + 0.5 * kl0 + token_loss(0.25)) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["kl/anchor"] == pytest.approx(kl0 / 2, abs=1e-6)
    assert m["implicit/weight"] == pytest.approx(1.0 if name == "sft_kl" else (0.7 + 0.25) / 2, abs=1e-6)
    # beta = kl_coef: log(0.7/0.2) + log(0.25/0.25), times 0.5
    assert m["implicit/reward"] == pytest.approx(0.5 * math.log(3.5), abs=1e-6)
    out.loss.backward()
    assert logits.grad[0, 2].abs().max().item() == 0.0


@pytest.mark.parametrize("name,unanchored", [("sft_kl", "sft"), ("asft", "dft")])
def test_at_the_reference_the_anchor_adds_nothing(name, unanchored):
    # pi = pi_ref: the KL is 0 and so is its gradient; away from it, the anchor pulls.
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :2] = -100

    def grad(cfg, ref_logits=None):
        x = logits.clone().requires_grad_(True)
        logps, mask = token_logps(x, labels)
        objective = build_objective(cfg)
        ref_logps = logps.detach()
        if objective.needs_reference_logits:
            out = objective(logps, ref_logps, mask, logits=x, ref_logits=ref_logits)
        else:
            out = objective(logps, ref_logps, mask)
        out.loss.backward()
        return x.grad, out

    base, _ = grad({"name": unanchored})
    same, out = grad({"name": name, "kl_coef": 1.0}, ref_logits=logits.clone())
    assert out.metrics["kl/anchor"].item() == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(same, base, rtol=1e-5, atol=1e-7)
    moved, _ = grad({"name": name, "kl_coef": 1.0}, ref_logits=logits + torch.randn_like(logits))
    assert not torch.allclose(moved, base, atol=1e-4)


def test_training_step_runs_the_reference_and_matches_an_independent_computation():
    # The step as a stage wires it (tiny Llama policy and reference), against the loss written
    # out in plain torch on the same logits: token-mean of -log p + lambda KL(pi || pi_ref).
    batch = collate_demonstrations(examples("sft"), PAD)
    policy, reference = tiny_model(0), tiny_model(1).eval().requires_grad_(False)
    out = demonstration_step(build_objective({"name": "sft_kl", "kl_coef": 0.3}), reference)(policy, batch)
    out.loss.backward()
    mine = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logp = F.log_softmax(policy(**inputs).logits[:, :-1].double(), -1)
    logq = F.log_softmax(reference(**inputs).logits[:, :-1].double(), -1)
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    loss = ((nll + 0.3 * kl) * mask).sum() / mask.sum()
    loss.backward()
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert out.metrics["kl/anchor"].item() > 1e-3  # two different models
    for name, grad in mine.items():
        torch.testing.assert_close(grad, policy.get_parameter(name).grad.float(), rtol=1e-4, atol=1e-6)
    # and with the policy as its own reference, sft_kl's step is sft's
    same = tiny_model(0).eval().requires_grad_(False)
    policy.zero_grad()
    demonstration_step(build_objective({"name": "sft_kl"}), same)(policy, batch).loss.backward()
    anchored = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    demonstration_step(build_objective({"name": "sft"}))(policy, batch).loss.backward()
    for a, b in zip(anchored, [p.grad for p in policy.parameters()], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Optima of a free categorical policy at one state (docs/objectives.md, implicit-reward reading)

P_E = [0.4, 0.3, 0.2, 0.1, 0.0]  # the demonstrator's next-token distribution
Q_REF = [0.1, 0.2, 0.3, 0.3, 0.1]  # the reference's


def _optimise(name: str, params: dict, steps: int = 1000) -> list[float]:
    """Train one logit vector z under `name`, on 10 demonstrated tokens drawn in the
    proportions of P_E at one state (every position shares z), to convergence."""
    tokens = [a for a, p in enumerate(P_E) for _ in range(round(10 * p))]  # 4 x a0, 3 x a1, 2 x a2, 1 x a3
    labels = torch.tensor([[-100, *tokens]])  # (1, 11): 10 scored positions, all at the same state
    ref_row = torch.log(torch.tensor(Q_REF, dtype=torch.float64))
    z = ref_row.clone().requires_grad_(True)  # start at the reference
    objective = build_objective({"name": name, **params})
    optimiser = torch.optim.Adam([z], lr=0.1)
    for _ in range(steps):
        logits = z.expand(1, labels.shape[1], len(P_E))
        logps, mask = token_logps(logits, labels)
        extra = {"logits": logits, "ref_logits": ref_row.expand_as(logits)} if objective.needs_reference_logits else {}
        loss = objective(logps, logps.detach(), mask, **extra).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return torch.softmax(z.detach(), -1).tolist()


def _normalised(weights: list[float]) -> list[float]:
    return [w / sum(weights) for w in weights]


def test_prior_leaning_optimum_sharpens_the_demonstrations():
    # max sum_a pE(a) pi(a)^alpha / alpha  =>  pi ∝ pE^(1 / (1 - alpha)) for 0 < alpha < 1
    pi = _optimise("prior_leaning", {"alpha": 0.5})
    assert pi == pytest.approx(_normalised([p**2 for p in P_E]), abs=2e-3)


def test_dft_optimum_is_the_demonstrations_mode():
    # max sum_a pE(a) pi(a): linear in pi, so all mass on argmax pE, whatever pi_ref
    pi = _optimise("dft", {}, steps=600)
    assert pi[0] > 0.99


def test_asft_optimum_is_the_kl_regularised_policy_with_reward_pE():
    # max sum_a pE(a) pi(a) - lambda KL(pi || pi_ref)  =>  pi ∝ pi_ref exp(pE / lambda):
    # the implicit reward lambda log pi/pi_ref is the demonstrator's probability (plus a constant)
    lam = 0.2
    pi = _optimise("asft", {"kl_coef": lam, "kl_direction": "policy_ref"})  # the optimum of this direction
    assert pi == pytest.approx(_normalised([q * math.exp(p / lam) for p, q in zip(P_E, Q_REF, strict=True)]),
                               abs=2e-3)


def test_sft_kl_optimum_has_the_implicit_reward_pE_over_pi():
    # stationarity of -sum pE log pi + lambda KL(pi || pi_ref) on the simplex:
    # lambda log pi(a)/pi_ref(a) = pE(a)/pi(a) + const
    lam = 0.2
    pi = _optimise("sft_kl", {"kl_coef": lam}, steps=4000)  # pi(a4) -> small: slow to settle
    gaps = [lam * math.log(a / q) - p / a for a, p, q in zip(pi, P_E, Q_REF, strict=True)]
    assert max(gaps) - min(gaps) < 1e-3, gaps


# --------------------------------------------------------------------------------------------
# Registry, parameters and errors


def test_new_objectives_defaults_and_what_they_need():
    expected = {
        "dft": ({}, False),
        "prior_leaning": ({"alpha": 1.0}, False),
        "sft_kl": ({"kl_coef": 0.05, "kl_direction": "policy_ref"}, True),
        "asft": ({"kl_coef": 0.05, "kl_direction": "ref_policy"}, True),  # ASFT's released code
    }
    for name, (params, logits) in expected.items():
        objective = build_objective({"name": name})
        assert objective.params() == params and objective.data_kind == "demonstrations"
        assert objective.needs_reference and objective.needs_reference_logits is logits
        assert objective.loss_units(MASK) == 2  # token-averaged: the scored tokens
    assert not build_objective({"name": "sft"}).needs_reference_logits
    assert not build_objective({"name": "dpo"}).needs_reference_logits


@pytest.mark.parametrize("cfg,match", [
    ({"name": "prior_leaning", "alpha": -0.5}, r"objective\.alpha must be >= 0"),
    ({"name": "prior_leaning", "alpha": "big"}, r"objective\.alpha must be a finite number"),
    ({"name": "asft", "kl_coef": -1}, r"objective\.kl_coef must be >= 0"),
    ({"name": "sft_kl", "kl_direction": "forward"}, r"objective\.kl_direction must be one of policy_ref, ref_policy"),
    ({"name": "dft", "beta": 0.1}, r"objective\.beta for objective 'dft'.*none \(it takes no parameters\)"),
])
def test_bad_parameters_name_the_key(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_objective(cfg)


def test_anchored_objectives_refuse_to_run_without_logits():
    objective = build_objective({"name": "asft"})
    with pytest.raises(ValueError, match="needs the policy's and the reference's logits"):
        objective(torch.log(torch.tensor([P])), REF, MASK)
    with pytest.raises(ValueError, match="needs a reference model in the training step"):
        demonstration_step(objective)


# --------------------------------------------------------------------------------------------
# Through the CLI


@pytest.mark.slow  # about 20 s per objective on two CPU cores
@pytest.mark.parametrize("name", ["dft", "prior_leaning", "sft_kl", "asft"])
def test_train_stage_with_each_new_objective(name, tmp_path, model_cache):
    ibridge(["train", f"objective={name}", "debug=smoke", "trainer.num_threads=1", "sft.max_steps=3",
             "logger=none", "hydra.run.dir=run"], tmp_path, model_cache)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    record = results["stages"]["sft"]
    assert results["status"] == "completed" and record["objective"] == name and record["steps"] == 3
    base = load_file(str(Path(record["init"]) / "model.safetensors"))
    trained = load_file(str(Path(record["checkpoint"]) / "model.safetensors"))
    assert any(not torch.equal(base[k], trained[k]) for k in base), f"{name} did not change any parameter"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    keys = set().union(*records)
    assert {"implicit/reward", "implicit/token_reward", "implicit/weight", "logps/policy", "logps/ref",
            "train/nll_per_token", "kl/token"} <= keys
    assert ("kl/anchor" in keys) is (name in ("sft_kl", "asft"))
    assert record["kl_token"] > 0


def test_asft_by_default_is_the_released_codes_loss():
    # github.com/zhuchichi56/ASFT train_v2.py, mode asft: per valid token
    # -p_t.detach() * log p_t + kl_weight * F.kl_div(log_softmax(logits), softmax(ref_logits)).sum(-1),
    # averaged over the valid tokens; computed here with torch.nn.functional, apart from ibridge's KL code.
    from tests.conftest import compose_config

    assert compose_config(["objective=asft"]).objective.kl_direction == "ref_policy"
    assert compose_config(["objective=sft_kl"]).objective.kl_direction == "policy_ref"  # design.md §1's anchor
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    ref_logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, :2] = -100
    logps, mask = token_logps(logits, labels)
    ref_logps, _ = token_logps(ref_logits, labels)
    out = build_objective({"name": "asft", "kl_coef": 0.1})(logps, ref_logps, mask, logits=logits,
                                                            ref_logits=ref_logits)
    shift_logits, shift_ref, shift_labels = logits[:, :-1], ref_logits[:, :-1], labels[:, 1:]
    valid = shift_labels != -100
    logp = F.log_softmax(shift_logits, -1).gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    kl = F.kl_div(F.log_softmax(shift_logits, -1), F.softmax(shift_ref, -1), reduction="none").sum(-1)
    released = ((-logp.exp().detach() * logp + 0.1 * kl) * valid).sum() / valid.sum()
    assert out.loss.item() == pytest.approx(released.item(), abs=1e-6)
