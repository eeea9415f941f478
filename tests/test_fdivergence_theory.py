"""Properties of the f-divergence objectives that docs/design.md §1 says the tests should pin down:

a. TV is SFT: its gradient is beta x the sequence-summed SFT gradient and nothing reaches the
   reference. Under Adam beta changes nothing only while gradient clipping does not bind:
   through the trainer (`ibridge.training.optimise`, default `max_grad_norm` 1.0) it does.
b. At pi = pi_ref every objective has tv's gradient (g'(0) = 1), at both granularities.
c. Safe domain: loss and gradient finite for s in [-1e3, 1e3], g and g' continuous at the
   continuation point s*, g' <= max_weight.
d. Free categorical distribution: tv's optimum is pi_E; the others end closer to pi_ref in
   KL(pi || pi_ref), more so as beta grows.
e. tv at token granularity with beta = 1 has exactly sft's gradient.
"""

from __future__ import annotations

import math

import pytest
import torch

from ibridge.objectives import build_objective, sequence_logps, token_logps
from ibridge.runtime import Runtime
from ibridge.training import OptimSettings, optimise

FDIVS = ["tv", "chi2", "hellinger", "jsd", "rkl"]
CAPPED = ["chi2", "hellinger", "jsd", "rkl"]
GRANULARITIES = ["sequence", "token"]


class TinyLM(torch.nn.Module):
    """A bigram 'language model': enough parameters shared across positions to make gradients
    non-trivial, small enough to be instant."""

    def __init__(self, vocab: int = 7, dim: int = 5, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=g, dtype=torch.float64))
        self.out = torch.nn.Parameter(torch.randn(dim, vocab, generator=g, dtype=torch.float64))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.emb[input_ids] @ self.out  # (B, T, V)


def make_batch(seed: int = 0, batch: int = 4, length: int = 6, vocab: int = 7):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, length), generator=g)
    labels = input_ids.clone()
    prompt_len = torch.randint(1, 3, (batch,), generator=g)
    for b in range(batch):
        labels[b, : prompt_len[b]] = -100  # the prompt is not scored
    labels[-1, -1] = -100  # ragged ends
    return input_ids, labels


def grads_of(loss: torch.Tensor, params) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(params), retain_graph=True))


# --------------------------------------------------------------------------------------------
# a. TV is SFT


@pytest.mark.parametrize("beta", [0.05, 1.0, 3.0])
def test_a_tv_gradient_is_beta_times_sequence_summed_sft_gradient(beta):
    policy, reference = TinyLM(seed=0), TinyLM(seed=1)
    input_ids, labels = make_batch()
    logps, mask = token_logps(policy(input_ids), labels)  # (B, T-1)
    ref_logps, _ = token_logps(reference(input_ids), labels)  # not detached on purpose
    loss = build_objective({"name": "tv", "beta": beta})(logps, ref_logps, mask).loss
    loss.backward(retain_graph=True)
    tv_grads = [p.grad.clone() for p in policy.parameters()]
    # nothing feeding only the reference term receives a gradient
    assert all(p.grad is None or not p.grad.any() for p in reference.parameters())
    # -beta * d/dtheta mean_b sum_t log pi(a_t|s_t)
    sft_seq = -sequence_logps(logps, mask).mean()
    expected = [beta * g for g in grads_of(sft_seq, policy.parameters())]
    for got, want in zip(tv_grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_tv_gradient_ignores_the_reference_other_objectives_do_not():
    policy = TinyLM(seed=0)
    input_ids, labels = make_batch()
    logps, mask = token_logps(policy(input_ids), labels)
    g = torch.Generator().manual_seed(7)
    # two references near the policy, so that every s stays inside the nonlinear part of g
    ref_a = logps.detach() + 0.3 * torch.randn(logps.shape, generator=g, dtype=logps.dtype)
    ref_b = logps.detach() + 0.3 * torch.randn(logps.shape, generator=g, dtype=logps.dtype)
    for name in FDIVS:
        obj = build_objective({"name": name, "beta": 0.2})
        grad_a = grads_of(obj(logps, ref_a, mask).loss, policy.parameters())
        grad_b = grads_of(obj(logps, ref_b, mask).loss, policy.parameters())
        same = all(torch.equal(x, y) for x, y in zip(grad_a, grad_b, strict=True))
        # tv: the KL anchor is a constant, its gradient is exactly zero; the others keep it alive
        assert same == (name == "tv"), name


def train_tv_through_the_trainer(beta: float, max_grad_norm: float, steps: int = 20):
    """`steps` optimiser steps of tv on TinyLM through `ibridge.training.optimise` (AdamW without
    weight decay, constant lr, the trainer's gradient clipping): the final parameters and each
    step's gradient norm before clipping."""
    input_ids, labels = make_batch()
    ref_logps, _ = token_logps(TinyLM(seed=1)(input_ids).detach(), labels)
    items = [{"input_ids": i, "labels": lab, "ref_logps": r} for i, lab, r in zip(input_ids, labels, ref_logps,
                                                                                    strict=True)]

    def collate(rows):
        batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        return batch

    objective = build_objective({"name": "tv", "beta": beta})

    def compute(model, batch):
        logps, mask = token_logps(model(batch["input_ids"]), batch["labels"])
        return objective(logps, batch["ref_logps"], mask)

    settings = OptimSettings(lr=1e-2, max_steps=steps, batch_size=len(items), warmup_ratio=0.0,
                             schedule="constant", log_every=1, max_grad_norm=max_grad_norm, pack_sequences=False)
    norms = []
    policy = TinyLM(seed=0)
    optimise(policy, items, collate, compute, settings, Runtime(torch.device("cpu"), "fp32"),
             log=lambda metrics, step: norms.append(metrics["train/grad_norm"]))
    return torch.cat([p.detach().flatten() for p in policy.parameters()]), norms


BETAS_A = (0.01, 1.0, 10.0)


def test_a_without_clipping_adam_makes_tv_invariant_to_beta():
    # max_grad_norm far above any gradient norm: clipping never scales the gradient, and Adam's
    # update m / (sqrt(v) + eps) is then invariant to the loss scale beta up to eps = 1e-8.
    runs = {beta: train_tv_through_the_trainer(beta, max_grad_norm=1e12) for beta in BETAS_A}
    start = torch.cat([p.detach().flatten() for p in TinyLM(seed=0).parameters()])
    assert (runs[1.0][0] - start).abs().max() > 0.1  # the runs did move
    # Tolerance atol = 5e-5 on parameters of order 1: eps matters only where a gradient
    # coordinate is near eps / beta, so its effect is largest at the smallest beta (measured after
    # 20 steps of lr 1e-2: 1e-5 at beta 0.01, 9e-8 at beta 10), and far below the 7e-3 that
    # clipping makes (next test).
    for beta in (0.01, 10.0):
        torch.testing.assert_close(runs[beta][0], runs[1.0][0], rtol=0, atol=5e-5)


def test_a_with_the_trainers_clipping_beta_changes_tv():
    # The default max_grad_norm = 1.0 binds at every step for beta = 1 and 10 (gradient norms
    # above 1), never for 0.01. Clipping replaces g by g / |g|, a rescaling that differs from step
    # to step, which Adam's running moments do not undo: the unclipped and the clipped runs part.
    runs = {beta: train_tv_through_the_trainer(beta, max_grad_norm=OptimSettings.max_grad_norm)
            for beta in BETAS_A}
    assert max(runs[0.01][1]) < 1.0 < min(runs[1.0][1]) and min(runs[10.0][1]) > 1.0
    assert (runs[0.01][0] - runs[1.0][0]).abs().max() > 1e-3  # measured: 7e-3
    # Clipped at every step, g / |g| no longer depends on beta: invariant again (up to rounding).
    torch.testing.assert_close(runs[10.0][0], runs[1.0][0], rtol=0, atol=1e-8)


# --------------------------------------------------------------------------------------------
# b. At pi = pi_ref every objective has tv's gradient


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_b_every_objective_has_tv_gradient_at_reference(granularity, beta):
    policy = TinyLM(seed=3)
    input_ids, labels = make_batch(seed=1)
    logps, mask = token_logps(policy(input_ids), labels)
    ref_logps = logps.detach().clone()  # pi = pi_ref
    cfg = {"beta": beta, "granularity": granularity}
    tv = grads_of(build_objective({"name": "tv", **cfg})(logps, ref_logps, mask).loss, policy.parameters())
    assert any(g.abs().max() > 1e-3 for g in tv)
    for name in CAPPED:
        out = build_objective({"name": name, **cfg})(logps, ref_logps, mask)
        assert out.metrics["implicit/weight"].item() == pytest.approx(1.0, abs=1e-12)
        for got, want in zip(grads_of(out.loss, policy.parameters()), tv, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_b_away_from_reference_high_reward_demonstrations_weigh_less():
    # g concave: the demonstration whose implicit reward is already high gets less weight
    s = torch.tensor([-0.3, 0.0, 0.3, 1.0], dtype=torch.float64)
    for name in CAPPED:
        w = build_objective({"name": name}).g_prime(s)
        assert (w[1:] < w[:-1]).all(), name


# --------------------------------------------------------------------------------------------
# c. Safe domain


S_GRID = torch.cat(
    [torch.linspace(-1e3, 1e3, 4001, dtype=torch.float64), torch.linspace(-3, 3, 601, dtype=torch.float64)]
)


@pytest.mark.parametrize("max_weight", [1.5, 10.0, 1e4])
@pytest.mark.parametrize("name", FDIVS)
def test_c_g_and_gradient_finite_and_capped_everywhere(name, max_weight):
    obj = build_objective({"name": name, "max_weight": max_weight})
    for dtype in (torch.float64, torch.float32):
        s = S_GRID.to(dtype).requires_grad_()
        values = obj.g(s)
        (grads,) = torch.autograd.grad(values.sum(), s)
        assert torch.isfinite(values).all() and torch.isfinite(grads).all()
        assert (grads >= 0).all() and (grads <= max_weight * (1 + 1e-6)).all()
        # concave: g' non-increasing
        assert (grads[1:4001] <= grads[:4000] * (1 + 1e-6) + 1e-30).all()
        torch.testing.assert_close(obj.g_prime(s.detach()), grads)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", FDIVS)
def test_c_objective_loss_and_gradient_finite_for_extreme_rewards(name, granularity):
    beta = 0.1
    # per-unit implicit rewards from -1e3 to 1e3 (sequence: split over 4 tokens)
    s = torch.tensor([-1e3, -250.0, -3.0, -0.9, 0.0, 0.5, 40.0, 1e3])
    tokens = 4 if granularity == "sequence" else 1
    diffs = (s / beta / tokens).unsqueeze(-1).expand(-1, tokens)  # (B, T)
    ref = torch.full_like(diffs, -50.0)
    policy = (ref + diffs).clone().requires_grad_()  # log-probs need not be <= 0 here
    mask = torch.ones_like(diffs, dtype=torch.bool)
    out = build_objective({"name": name, "beta": beta, "granularity": granularity})(policy, ref, mask)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(policy.grad).all()
    assert all(torch.isfinite(v) for v in out.metrics.values())
    # each unit's weight relative to SFT is g'(s) in [0, max_weight]
    per_token_sft = beta / (len(s) if granularity == "sequence" else len(s) * tokens)
    weights = -policy.grad / per_token_sft
    assert (weights >= 0).all() and (weights <= 10.0 * (1 + 1e-5)).all()


@pytest.mark.parametrize("max_weight", [2.0, 10.0, 100.0])
@pytest.mark.parametrize("name", CAPPED)
def test_c_g_and_g_prime_continuous_at_continuation_point(name, max_weight):
    obj = build_objective({"name": name, "max_weight": max_weight})
    s_star = obj.s_star
    assert obj.g_prime(torch.tensor([s_star], dtype=torch.float64)).item() == pytest.approx(
        max_weight, rel=1e-12
    )
    jumps_g, jumps_gp = [], []
    for eps in (1e-6, 1e-7, 1e-8):
        s = torch.tensor([s_star - eps, s_star + eps], dtype=torch.float64, requires_grad=True)
        values = obj.g(s)
        (grads,) = torch.autograd.grad(values.sum(), s)
        assert grads[0].item() == max_weight  # left: the tangent line's slope
        jumps_g.append(abs(values[1] - values[0]).item())
        jumps_gp.append(abs(grads[1] - grads[0]).item())
    # both jumps vanish linearly with eps: no discontinuity in g or g'
    assert jumps_g[-1] < 2.1 * max_weight * 1e-8
    assert jumps_gp[-1] < 1e-3 * max_weight
    assert jumps_gp[0] / jumps_gp[1] == pytest.approx(10, rel=0.05)


# --------------------------------------------------------------------------------------------
# d. Free categorical distribution

PI_REF = torch.tensor([0.40, 0.25, 0.15, 0.12, 0.08], dtype=torch.float64)
PI_E = torch.tensor([0.05, 0.10, 0.20, 0.25, 0.40], dtype=torch.float64)
BETAS = (0.1, 0.3, 1.0)
# KL(pi* || pi_ref) at the exact optimum, from an independent root-finding solution of the
# stationarity condition pi(y) ∝ pi_E(y) g'(beta log pi(y)/pi_ref(y)) (scipy, not this code).
EXPECTED_KL = {
    ("chi2", 0.1): 0.64090,
    ("hellinger", 0.1): 0.51996,
    ("jsd", 0.1): 0.51947,
    ("rkl", 0.1): 0.59669,
    ("chi2", 0.3): 0.55205,
    ("hellinger", 0.3): 0.31594,
    ("jsd", 0.3): 0.31207,
    ("rkl", 0.3): 0.45499,
    ("chi2", 1.0): 0.30095,
    ("hellinger", 1.0): 0.09540,
    ("jsd", 1.0): 0.08920,
    ("rkl", 1.0): 0.20828,
}


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p / q).log()).sum())


@pytest.fixture(scope="module")
def categorical_optima():
    """Optimise free logits under E_{y ~ pi_E}[-g(beta log pi(y)/pi_ref(y))] with Adam, exactly
    in expectation. All (objective, beta) cells run as rows of one tensor: Adam is elementwise, so
    this is the same as separate runs, only faster."""
    cells = [(name, beta) for beta in BETAS for name in FDIVS]
    objs = [build_objective({"name": n, "beta": b}) for n, b in cells]
    logits = PI_REF.log().repeat(len(cells), 1).requires_grad_()  # start at pi = pi_ref
    steps = 500
    opt = torch.optim.Adam([logits], lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    for _ in range(steps):
        log_pi = logits.log_softmax(-1)  # (cells, K)
        loss = sum(-(PI_E * o.g(o.beta * (log_pi[i] - PI_REF.log()))).sum() for i, o in enumerate(objs))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    pis = logits.detach().softmax(-1)
    return {cell: (objs[i], pis[i]) for i, cell in enumerate(cells)}


def test_d_tv_recovers_the_demonstrator(categorical_optima):
    for beta in BETAS:
        _, pi = categorical_optima[("tv", beta)]
        assert 0.5 * (pi - PI_E).abs().sum().item() < 1e-3


def test_d_optimisation_reached_the_stationary_point(categorical_optima):
    # pi(y) ∝ pi_E(y) g'(s_y): the KKT condition of the concave problem on the simplex
    for (name, beta), (obj, pi) in categorical_optima.items():
        s = beta * (pi / PI_REF).log()
        target = PI_E * obj.g_prime(s)
        torch.testing.assert_close(pi, target / target.sum(), rtol=1e-5, atol=1e-7, msg=f"{name} {beta}")
        if name != "tv":
            # the cap does not bind at these optima, so they are those of the uncapped g
            assert (s > obj.s_star).all(), (name, beta)
            assert kl(pi, PI_REF) == pytest.approx(EXPECTED_KL[(name, beta)], abs=2e-5)


def test_d_rkl_optimum_is_the_geometric_mixture(categorical_optima):
    # g' = e^-s gives pi ∝ pi_E * (pi_ref / pi)^beta, i.e. pi ∝ (pi_E pi_ref^beta)^(1/(1+beta))
    for beta in BETAS:
        _, pi = categorical_optima[("rkl", beta)]
        closed = (PI_E * PI_REF**beta) ** (1 / (1 + beta))
        torch.testing.assert_close(pi, closed / closed.sum(), rtol=1e-5, atol=1e-7)


def test_d_other_objectives_stay_closer_to_reference_more_so_with_larger_beta(categorical_optima):
    kl_tv = kl(PI_E, PI_REF)  # 0.6892
    for name in CAPPED:
        kls = [kl(categorical_optima[(name, beta)][1], PI_REF) for beta in BETAS]
        assert kls[0] < kl_tv - 0.03, (name, kls)
        assert kls[0] > kls[1] > kls[2], (name, kls)


# --------------------------------------------------------------------------------------------
# e. Token-level tv with beta = 1 is SFT


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_e_token_tv_beta_one_has_sft_gradient(seed):
    g = torch.Generator().manual_seed(seed)
    policy = (-3 * torch.rand(5, 9, generator=g, dtype=torch.float64)).requires_grad_()
    ref = -3 * torch.rand(5, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 9, generator=g) > 0.4
    tv = build_objective({"name": "tv", "beta": 1.0, "granularity": "token"})(policy, ref, mask)
    sft = build_objective({"name": "sft"})(policy, None, mask)
    (g_tv,) = torch.autograd.grad(tv.loss, policy)
    (g_sft,) = torch.autograd.grad(sft.loss, policy)
    torch.testing.assert_close(g_tv, g_sft, rtol=0, atol=1e-15)
    # the losses differ by the constant mean_t log pi_ref over scored tokens
    assert (tv.loss - sft.loss).item() == pytest.approx(ref[mask].mean().item(), abs=1e-12)


def test_e_token_tv_beta_one_has_sft_gradient_through_a_model():
    policy = TinyLM(seed=4)
    input_ids, labels = make_batch(seed=2)
    logps, mask = token_logps(policy(input_ids), labels)
    ref_logps, _ = token_logps(TinyLM(seed=5)(input_ids).detach(), labels)
    tv = build_objective({"name": "tv", "beta": 1.0, "granularity": "token"})(logps, ref_logps, mask).loss
    sft = build_objective({"name": "sft"})(logps, None, mask).loss
    for got, want in zip(grads_of(tv, policy.parameters()), grads_of(sft, policy.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
