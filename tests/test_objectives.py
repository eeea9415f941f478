"""Hand-computed cases for ibridge.objectives (docs/design.md §1, §4): log-prob extraction, SFT, the
f-divergence generators, DPO / cDPO / IPO, and the registry's errors."""

from __future__ import annotations

import math

import pytest
import torch

from ibridge.objectives import (
    DEMONSTRATIONS,
    OBJECTIVES,
    PREFERENCES,
    ObjectiveOutput,
    available_objectives,
    build_objective,
    data_kind_of,
    label_logps,
    sequence_logps,
    token_logps,
)
from ibridge.objectives import logprobs as logprobs_module

FDIVS = ["tv", "chi2", "hellinger", "jsd", "rkl"]


def log_softmax_list(row: list[float]) -> list[float]:
    z = math.log(sum(math.exp(v) for v in row))
    return [v - z for v in row]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# --------------------------------------------------------------------------------------------
# token_logps / sequence_logps


LOGITS_1x4x3 = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, -2.0], [0.3, 0.1, 0.2]]


def test_token_logps_shift_and_mask_hand_case():
    logits = torch.tensor([LOGITS_1x4x3])  # (1, 4, 3)
    # labels[0] is the prompt (never predicted), labels[2] is masked, labels[1] and [3] scored.
    labels = torch.tensor([[-100, 2, -100, 0]])  # (1, 4)
    logps, mask = token_logps(logits, labels)
    assert logps.shape == (1, 3) and mask.shape == (1, 3)
    assert logps.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.tolist() == [[True, False, True]]
    expected = [
        log_softmax_list(LOGITS_1x4x3[0])[2],  # position 0 predicts labels[1] = 2
        0.0,  # position 1 predicts labels[2] = -100: masked
        log_softmax_list(LOGITS_1x4x3[2])[0],  # position 2 predicts labels[3] = 0
    ]
    assert logps[0].tolist() == pytest.approx(expected, abs=1e-6)
    # position 3's logits predict nothing: changing them changes nothing
    logits2 = logits.clone()
    logits2[0, 3] = torch.tensor([9.0, -9.0, 0.0])
    assert torch.equal(token_logps(logits2, labels)[0], logps)
    # sequence sum over scored tokens
    assert sequence_logps(logps, mask).tolist() == pytest.approx([expected[0] + expected[2]], abs=1e-6)


def test_token_logps_custom_ignore_index_and_gradient_hand_case():
    logits = torch.tensor([LOGITS_1x4x3], requires_grad=True)
    labels = torch.tensor([[7, 1, 7, 7]])
    logps, mask = token_logps(logits, labels, ignore_index=7)
    assert mask.tolist() == [[True, False, False]]
    logps.sum().backward()
    # d log softmax(x)[1] / dx = onehot(1) - softmax(x) at position 0, zero elsewhere
    p = [math.exp(v) for v in log_softmax_list(LOGITS_1x4x3[0])]
    assert logits.grad[0, 0].tolist() == pytest.approx([-p[0], 1 - p[1], -p[2]], abs=1e-6)
    assert torch.count_nonzero(logits.grad[0, 1:]) == 0


def test_sequence_logps_ignores_masked_entries():
    logps = torch.tensor([[-1.0, -2.0, -4.0], [-0.5, -8.0, -0.25]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    assert sequence_logps(logps, mask).tolist() == [-3.0, -0.75]


def _reference_logps(logits, targets):
    return logits.double().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("chunk", [2**25, 7])  # 7 elements: one row per chunk (V = 11)
def test_label_logps_matches_log_softmax_values_and_gradients(monkeypatch, chunk):
    monkeypatch.setattr(logprobs_module, "_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, 11, generator=g)).requires_grad_()
    targets = torch.randint(0, 11, (2, 5), generator=g)
    weights = torch.randn(2, 5, generator=g)
    ours = label_logps(logits, targets)
    (ours * weights).sum().backward()
    ours_grad = logits.grad.clone()
    logits.grad = None
    ref = _reference_logps(logits, targets)
    (ref * weights).sum().backward()
    torch.testing.assert_close(ours.double(), ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_grad, logits.grad, atol=1e-5, rtol=0)


def test_label_logps_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 4, (2, 3), generator=g)
    assert torch.autograd.gradcheck(lambda x: label_logps(x, targets), (logits,))


def test_token_logps_bf16_logits_are_computed_in_float32():
    g = torch.Generator().manual_seed(2)
    logits = (4 * torch.randn(2, 6, 50, generator=g)).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 6), generator=g)
    labels[:, :2] = -100
    logps, mask = token_logps(logits, labels)
    assert logps.dtype == torch.float32
    expected = _reference_logps(logits[:, :-1].float(), labels[:, 1:].clamp(min=0)) * mask
    torch.testing.assert_close(logps.double(), expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# SFT


def test_sft_hand_case():
    sft = build_objective({"name": "sft"})
    assert sft.data_kind == DEMONSTRATIONS and not sft.needs_reference
    policy = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0], [-3.0, -1.0, -2.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    out = sft(policy, None, mask)
    assert isinstance(out, ObjectiveOutput)
    # 6 scored tokens, -log-probs sum to 1 + 2 + 0.5 + 3 + 1 + 2 = 9.5
    assert out.loss.item() == pytest.approx(9.5 / 6)
    assert out.metrics["train/nll_per_token"].item() == pytest.approx(9.5 / 6)
    assert out.metrics["logps/policy"].item() == pytest.approx((-3.0 - 0.5 - 6.0) / 3)
    out.loss.backward()
    torch.testing.assert_close(policy.grad, -mask.float() / 6)


# --------------------------------------------------------------------------------------------
# f-divergence generators (docs/design.md §1 table)


CLOSED_FORMS = {
    "tv": (lambda s: s, lambda s: 1.0),
    "chi2": (lambda s: 2 * (math.sqrt(1 + s) - 1), lambda s: (1 + s) ** -0.5),
    "hellinger": (lambda s: s / (1 + s), lambda s: (1 + s) ** -2),
    "jsd": (lambda s: math.log(2 - math.exp(-s)), lambda s: math.exp(-s) / (2 - math.exp(-s))),
    "rkl": (lambda s: 1 - math.exp(-s), lambda s: math.exp(-s)),
}
S_STAR_10 = {"chi2": -0.99, "hellinger": 10**-0.5 - 1, "jsd": math.log(11 / 20), "rkl": -math.log(10)}


@pytest.mark.parametrize("name", FDIVS)
def test_g_matches_closed_form_inside_safe_domain(name):
    obj = build_objective({"name": name})
    g, gp = CLOSED_FORMS[name]
    points = [-0.5, -0.1, 0.3, 2.0, 7.5]
    s = torch.tensor(points, dtype=torch.float64, requires_grad=True)
    values = obj.g(s)
    (grads,) = torch.autograd.grad(values.sum(), s)
    assert values.tolist() == pytest.approx([g(x) for x in points], rel=1e-12, abs=1e-12)
    assert grads.tolist() == pytest.approx([gp(x) for x in points], rel=1e-12, abs=1e-12)
    assert obj.g_prime(s.detach()).tolist() == pytest.approx([gp(x) for x in points], rel=1e-12)


@pytest.mark.parametrize("name", FDIVS)
def test_g_normalised_at_zero(name):
    obj = build_objective({"name": name})
    s = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    value = obj.g(s)
    (grad,) = torch.autograd.grad(value.sum(), s)
    assert value.item() == 0.0
    assert grad.item() == pytest.approx(1.0, abs=1e-15)
    assert obj.g_prime(s.detach()).item() == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("name", ["chi2", "hellinger", "jsd", "rkl"])
def test_continuation_point_and_tangent_line(name):
    obj = build_objective({"name": name, "max_weight": 10.0})
    g, gp = CLOSED_FORMS[name]
    s_star = S_STAR_10[name]
    assert obj.s_star == pytest.approx(s_star, rel=1e-12)
    assert gp(s_star) == pytest.approx(10.0, rel=1e-12)
    below = [s_star - 0.25, s_star - 3.0]
    values = obj.g(torch.tensor(below, dtype=torch.float64))
    assert values.tolist() == pytest.approx([g(s_star) + 10.0 * (x - s_star) for x in below], rel=1e-12)


def test_tv_has_no_continuation():
    assert build_objective({"name": "tv"}).s_star is None


def test_fdivergence_sequence_hand_case_and_metrics():
    beta = 0.5
    jsd = build_objective({"name": "jsd", "beta": beta})
    policy = torch.tensor([[-1.0, -2.0, -5.0], [-0.5, -5.0, -5.0], [-3.0, -1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -7.0], [-1.5, -7.0, -7.0], [-2.0, -1.0, -3.0]])
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    out = jsd(policy, ref, mask)
    diffs = [(-1.0 + 1.5) + (-2.0 + 1.0), -0.5 + 1.5, (-3.0 + 2.0) + 0.0 + (-2.0 + 3.0)]  # -0.5, 1, 0
    s = [beta * d for d in diffs]
    g, gp = CLOSED_FORMS["jsd"]
    assert out.loss.item() == pytest.approx(-sum(g(x) for x in s) / 3, abs=1e-7)
    m = out.metrics
    assert m["implicit/reward"].item() == pytest.approx(sum(s) / 3, rel=1e-6)
    token_rewards = [0.5, -1.0, 1.0, -1.0, 0.0, 1.0]
    assert m["implicit/token_reward"].item() == pytest.approx(beta * sum(token_rewards) / 6, rel=1e-6)
    assert m["implicit/weight"].item() == pytest.approx(sum(gp(x) for x in s) / 3, rel=1e-6)
    assert m["logps/policy"].item() == pytest.approx((-3.0 - 0.5 - 6.0) / 3, rel=1e-6)
    assert m["logps/ref"].item() == pytest.approx((-2.5 - 1.5 - 6.0) / 3, rel=1e-6)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())
    out.loss.backward()
    # dL/dlogpi_{b,t} = -beta * g'(s_b) / B on scored tokens
    expected = [[-beta * gp(s[b]) / 3 * float(mask[b, t]) for t in range(3)] for b in range(3)]
    torch.testing.assert_close(policy.grad, torch.tensor(expected))


def test_fdivergence_token_hand_case():
    beta = 2.0
    rkl = build_objective({"name": "rkl", "beta": beta, "granularity": "token"})
    policy = torch.tensor([[-1.0, -2.0], [-0.5, -5.0]])
    ref = torch.tensor([[-1.5, -1.0], [-1.0, -7.0]])
    mask = torch.tensor([[True, True], [True, False]])
    out = rkl(policy, ref, mask)
    s = [beta * 0.5, beta * -1.0, beta * 0.5]
    assert out.loss.item() == pytest.approx(-sum(1 - math.exp(-x) for x in s) / 3, rel=1e-6)
    assert out.metrics["implicit/weight"].item() == pytest.approx(sum(math.exp(-x) for x in s) / 3, rel=1e-6)
    # the sequence reward metric stays per sequence at token granularity
    assert out.metrics["implicit/reward"].item() == pytest.approx((beta * -0.5 + beta * 0.5) / 2, abs=1e-6)


def test_objectives_do_not_mutate_inputs():
    g = torch.Generator().manual_seed(3)
    policy, ref = -torch.rand(3, 4, generator=g), -torch.rand(3, 4, generator=g)
    mask = torch.rand(3, 4, generator=g) > 0.3
    copies = [t.clone() for t in (policy, ref, mask)]
    for name in ["sft", *FDIVS]:
        obj = build_objective({"name": name})
        obj(policy, ref, mask)
        obj(policy, ref, mask)
    assert all(torch.equal(a, b) for a, b in zip(copies, (policy, ref, mask), strict=True))


def test_fdivergence_requires_reference():
    with pytest.raises(ValueError, match="needs reference"):
        build_objective({"name": "chi2"})(torch.zeros(1, 2), None, torch.ones(1, 2, dtype=torch.bool))


# --------------------------------------------------------------------------------------------
# Preference objectives: 3-element batches computed by hand

PC = [-10.0, -12.0, -8.0]  # policy chosen
PR = [-11.0, -11.0, -9.5]  # policy rejected
RC = [-10.5, -11.0, -8.5]  # reference chosen
RR = [-10.0, -12.0, -9.0]  # reference rejected
# h = (pc - rc) - (pr - rr) = [0.5 - (-1.0), -1.0 - 1.0, 0.5 - (-0.5)] = [1.5, -2.0, 1.0]
H = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR, strict=True)]


def _pref_tensors():
    return [torch.tensor(v, requires_grad=i < 2) for i, v in enumerate((PC, PR, RC, RR))]


def test_hand_margins():
    assert H == [1.5, -2.0, 1.0]


def test_dpo_hand_case_and_metrics():
    beta = 0.5
    dpo = build_objective({"name": "dpo", "beta": beta})
    assert dpo.data_kind == PREFERENCES and dpo.needs_reference
    out = dpo(*_pref_tensors())
    expected = sum(-log_sigmoid(beta * h) for h in H) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    m = out.metrics
    chosen = [beta * (pc - rc) for pc, rc in zip(PC, RC, strict=True)]  # [0.25, -0.5, 0.25]
    rejected = [beta * (pr - rr) for pr, rr in zip(PR, RR, strict=True)]  # [-0.5, 0.5, -0.25]
    assert m["rewards/chosen"].item() == pytest.approx(sum(chosen) / 3)
    assert m["rewards/rejected"].item() == pytest.approx(sum(rejected) / 3)
    assert m["rewards/margins"].item() == pytest.approx((sum(chosen) - sum(rejected)) / 3)
    assert m["rewards/accuracies"].item() == pytest.approx(2 / 3)
    assert m["logps/chosen"].item() == pytest.approx(sum(PC) / 3)
    assert m["logps/rejected"].item() == pytest.approx(sum(PR) / 3)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


@pytest.mark.parametrize("name", ["dpo", "cdpo", "ipo"])
def test_reward_accuracy_counts_a_tie_as_wrong(name):
    # At step 0 the policy is its reference: every implicit reward is 0, chosen ties rejected,
    # and a pair is ranked right only when its chosen reward is strictly higher (TRL's rule).
    tied = [torch.tensor([-3.0, -1.0, -2.0]), torch.tensor([-4.0, -1.5, -2.0])]
    out = build_objective({"name": name})(tied[0], tied[1], tied[0].clone(), tied[1].clone())
    assert out.metrics["rewards/accuracies"].item() == 0.0
    # one pair ahead, one tied (equal margins to the reference), one behind: 1 of 3
    pc, pr = torch.tensor([-2.0, -1.0, -3.0]), torch.tensor([-4.0, -1.5, -2.0])
    rc, rr = torch.tensor([-3.0, -1.0, -2.0]), torch.tensor([-4.0, -1.5, -2.0])
    out = build_objective({"name": name})(pc, pr, rc, rr)
    assert out.metrics["rewards/accuracies"].item() == pytest.approx(1 / 3)


def test_dpo_gradient_hand_case():
    beta = 0.5
    pc, pr, rc, rr = _pref_tensors()
    build_objective({"name": "dpo", "beta": beta})(pc, pr, rc, rr).loss.backward()
    # d/dpc of -log sigmoid(beta h) / 3 = -beta * sigmoid(-beta h) / 3
    expected = [-beta / (1 + math.exp(beta * h)) / 3 for h in H]
    assert pc.grad.tolist() == pytest.approx(expected, rel=1e-6)
    assert pr.grad.tolist() == pytest.approx([-x for x in expected], rel=1e-6)


@pytest.mark.parametrize(
    ("cfg", "eps"), [({"name": "cdpo"}, 0.1), ({"name": "dpo", "label_smoothing": 0.2}, 0.2)]
)
def test_cdpo_hand_case(cfg, eps):
    beta = 0.1
    out = build_objective({**cfg, "beta": beta})(*_pref_tensors())
    expected = sum(-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in H) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_ipo_hand_case():
    beta = 0.25  # target margin 1 / (2 beta) = 2
    out = build_objective({"name": "ipo", "beta": beta})(*_pref_tensors())
    expected = ((1.5 - 2.0) ** 2 + (-2.0 - 2.0) ** 2 + (1.0 - 2.0) ** 2) / 3  # (0.25 + 16 + 1) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.metrics["rewards/margins"].item() == pytest.approx(beta * sum(H) / 3, rel=1e-6)


def test_dpo_is_stable_for_huge_margins():
    pc = torch.tensor([0.0, -5000.0], requires_grad=True)
    pr = torch.tensor([-5000.0, 0.0])
    zeros = torch.zeros(2)
    out = build_objective({"name": "cdpo", "beta": 1.0})(pc, pr, zeros, zeros)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(pc.grad).all()
    assert out.loss.item() == pytest.approx((0.1 * 5000 + 0.9 * 5000) / 2, rel=1e-6)


def test_preference_shape_check():
    dpo = build_objective({"name": "dpo"})
    with pytest.raises(ValueError, match=r"\(B,\)"):
        dpo(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))


# --------------------------------------------------------------------------------------------
# Registry


def test_available_objectives_and_kinds():
    assert available_objectives() == ["asft", "cdpo", "chi2", "dft", "dpo", "hellinger", "ipo", "jsd",
                                      "prior_leaning", "rkl", "sft", "sft_kl", "tv"]
    for name in available_objectives():
        obj = build_objective({"name": name})
        assert obj.name == name and OBJECTIVES[name] is type(obj)
        assert data_kind_of(name) == obj.data_kind
    assert data_kind_of("sft") == DEMONSTRATIONS and data_kind_of("jsd") == DEMONSTRATIONS
    assert data_kind_of("dpo") == PREFERENCES and data_kind_of("ipo") == PREFERENCES


def test_pearson_alias():
    obj = build_objective({"name": "pearson", "beta": 0.3})
    assert obj.name == "chi2" and obj.beta == 0.3
    assert data_kind_of("pearson") == DEMONSTRATIONS
    assert "pearson" not in available_objectives()


def test_defaults_and_params():
    assert build_objective({"name": "jsd"}).params() == {
        "beta": 0.1,
        "granularity": "sequence",
        "max_weight": 10.0,
    }
    assert build_objective({"name": "cdpo"}).params() == {"beta": 0.1, "label_smoothing": 0.1}
    assert build_objective({"name": "dpo"}).params() == {"beta": 0.1, "label_smoothing": 0.0}


def test_build_from_omegaconf():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"name": "hellinger", "beta": 0.2, "granularity": "token"})
    obj = build_objective(cfg)
    assert (obj.name, obj.beta, obj.granularity) == ("hellinger", 0.2, "token")


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_objective({"name": "simpo"})
    for name in available_objectives():
        assert name in str(err.value)
    with pytest.raises(ValueError, match="valid names"):
        data_kind_of("simpo")


@pytest.mark.parametrize("name", ["forward_kl", "fkl", "kl"])
def test_forward_kl_is_refused_with_the_reason(name):
    with pytest.raises(ValueError) as err:
        build_objective({"name": name})
    msg = str(err.value)
    assert "1 + log s" in msg and "boundary" in msg and "s = 0" in msg and "docs/design.md §1" in msg


def test_unknown_param_names_it_and_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        build_objective({"name": "jsd", "bta": 0.1})
    msg = str(err.value)
    assert "objective.bta" in msg and "beta" in msg and "granularity" in msg and "max_weight" in msg
    with pytest.raises(ValueError, match="objective.label_smoothing"):
        build_objective({"name": "ipo", "label_smoothing": 0.1})
    with pytest.raises(ValueError, match="objective.beta"):
        build_objective({"name": "sft", "beta": 0.1})


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"name": "jsd", "beta": 0.0}, "objective.beta"),
        ({"name": "dpo", "beta": -1.0}, "objective.beta"),
        ({"name": "tv", "beta": "big"}, "objective.beta"),
        ({"name": "chi2", "beta": float("nan")}, "objective.beta"),
        ({"name": "chi2", "granularity": "sentence"}, "objective.granularity"),
        ({"name": "rkl", "max_weight": 1.0}, "objective.max_weight"),
        ({"name": "dpo", "label_smoothing": 0.5}, "objective.label_smoothing"),
        ({"name": "cdpo", "label_smoothing": -0.1}, "objective.label_smoothing"),
    ],
)
def test_bad_values_name_the_key(cfg, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_objective(cfg)


def test_bad_granularity_lists_choices_and_max_weight_explains():
    with pytest.raises(ValueError, match="sequence, token"):
        build_objective({"name": "chi2", "granularity": "sentence"})
    with pytest.raises(ValueError, match=r"g'\(0\) = 1"):
        build_objective({"name": "jsd", "max_weight": 0.5})


def test_config_without_name():
    with pytest.raises(ValueError, match="'name'"):
        build_objective({"beta": 0.1})
