"""The f-divergence family of SFT objectives (docs/design.md §1).

docs/design.md §1 turns ``min_pi D_f(pi_E || pi) + beta * KL(pi || pi_ref)`` into a loss on
demonstrations only::

    L_f(theta) = - E_{(x, y) ~ demos} [ g_f(s) ],   s = beta * log pi_theta(y|x) / pi_ref(y|x),

with ``g_f`` the inverse of the convex conjugate ``f*``, normalised so that ``g(0) = 0`` and
``g'(0) = 1`` (so that at ``pi = pi_ref`` every member has the gradient of ``beta`` x SFT):

=============  =================================  ===============  =======================
objective      g(s)                               domain           g'(s)
=============  =================================  ===============  =======================
``tv``         s                                  all              1
``chi2``       2 (sqrt(1 + s) - 1)                s > -1           (1 + s)^(-1/2)
``hellinger``  s / (1 + s)                        s > -1           (1 + s)^(-2)
``jsd``        log(2 - e^(-s))                    s > -log 2       e^(-s) / (2 - e^(-s))
``rkl``        1 - e^(-s)                         all              e^(-s)
=============  =================================  ===============  =======================

``tv`` is SFT: its gradient is ``beta`` x the sequence-summed SFT gradient and the KL anchor
leaves only a constant. Forward KL (``g(s) = 1 + log s``) is not usable: the initial policy
(``s = 0``) lies on the boundary of its domain, so it is refused by the registry.

**Safe domain.** For ``chi2``, ``hellinger``, ``jsd`` and ``rkl`` the weight ``g'(s)`` grows
without bound as ``s`` falls (and ``g`` leaves its domain). Below the point ``s*`` where
``g'(s*) = max_weight`` (M) we replace ``g`` by its tangent line at ``s*`` — a C¹ linear
continuation, still concave — so loss and gradient are finite for every real ``s`` and no
example weighs more than M times its SFT weight. Closed forms:

=============  =========================  ==========================  ============================
objective      s*                         g(s*)                       s* at M = 10
=============  =========================  ==========================  ============================
``chi2``       M^(-2) - 1                 2 (1/M - 1)                 -0.99
``hellinger``  M^(-1/2) - 1               1 - sqrt(M)                 -0.6838
``jsd``        log((1 + M) / (2 M))       log(2 / (1 + M))            -0.5978
``rkl``        -log M                     1 - M                       -2.3026
=============  =========================  ==========================  ============================

``max_weight`` must exceed 1: ``g'(0) = 1`` and ``g'`` decreases, so a cap ≤ 1 would put ``s*``
at or above 0 and cut the objective at the initial policy.

Numerics: ``g`` and ``g'`` are evaluated in float64 (float32 on MPS, which lacks float64) on the
(B,) or (B, T) implicit rewards, a negligible cost next to the model; the nonlinear branch only
ever sees ``clamp(s, min=s*)``, so the branch that ``torch.where`` discards cannot produce NaN
gradients; for large positive ``s`` every ``g`` is evaluated in a form that cannot overflow.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import (
    DemonstrationObjective,
    ObjectiveOutput,
    check_choice,
    check_positive,
    check_real,
    masked_mean,
    unit_means,
)
from .logprobs import sequence_logps

GRANULARITIES = ("sequence", "token")


@dataclass(frozen=True)
class Generator:
    """``g`` and ``g'`` of one row of the docs/design.md §1 table, plus the continuation point.

    ``s_star(M)`` solves ``g'(s*) = M`` in closed form; None when ``g'`` is bounded by 1 (tv),
    where no continuation is needed.
    """

    name: str
    g: Callable[[Tensor], Tensor]
    g_prime: Callable[[Tensor], Tensor]
    s_star: Callable[[float], float] | None


GENERATORS: dict[str, Generator] = {
    "tv": Generator("tv", g=lambda s: s, g_prime=torch.ones_like, s_star=None),
    "chi2": Generator(
        "chi2",
        g=lambda s: 2.0 * (torch.sqrt(1.0 + s) - 1.0),
        g_prime=lambda s: torch.rsqrt(1.0 + s),
        s_star=lambda m: m**-2 - 1.0,
    ),
    "hellinger": Generator(
        "hellinger",
        g=lambda s: s / (1.0 + s),
        g_prime=lambda s: (1.0 + s) ** -2,
        s_star=lambda m: m**-0.5 - 1.0,
    ),
    "jsd": Generator(
        "jsd",
        # log(2 - e^-s) = log1p(-expm1(-s)): accurate near s = 0, no overflow for large s.
        g=lambda s: torch.log1p(-torch.expm1(-s)),
        g_prime=lambda s: torch.exp(-s) / (2.0 - torch.exp(-s)),
        s_star=lambda m: math.log((1.0 + m) / (2.0 * m)),
    ),
    "rkl": Generator(
        "rkl",
        g=lambda s: -torch.expm1(-s),
        g_prime=lambda s: torch.exp(-s),
        s_star=lambda m: -math.log(m),
    ),
}


@functools.lru_cache(maxsize=64)
def _continuation(generator: Generator, max_weight: float) -> tuple[float, float]:
    # (s*, g(s*)) as Python floats, computed once per (generator, cap) rather than per call
    assert generator.s_star is not None
    s_star = generator.s_star(max_weight)
    return s_star, generator.g(torch.tensor(s_star, dtype=torch.float64)).item()


def _compute_dtype(s: Tensor) -> torch.dtype:
    return torch.float32 if s.device.type == "mps" else torch.float64


def continued_g(s: Tensor, generator: Generator, max_weight: float) -> Tensor:
    """``g(s)`` with the tangent-line continuation below ``s*`` (docs/design.md §1, safe domain).

    Any shape; differentiable; finite for every finite ``s``. Returns ``s``'s dtype.
    """
    x = s.to(_compute_dtype(s))
    if generator.s_star is None:
        return generator.g(x).to(s.dtype)
    s_star, g_star = _continuation(generator, max_weight)
    inside = generator.g(x.clamp(min=s_star))  # never evaluated outside the domain
    tangent = g_star + max_weight * (x - s_star)
    return torch.where(x < s_star, tangent, inside).to(s.dtype)


def continued_g_prime(s: Tensor, generator: Generator, max_weight: float) -> Tensor:
    """``g'(s)`` of ``continued_g``: the example weight relative to SFT, at most ``max_weight``."""
    x = s.to(_compute_dtype(s))
    if generator.s_star is None:
        return generator.g_prime(x).to(s.dtype)
    s_star = generator.s_star(max_weight)
    inside = generator.g_prime(x.clamp(min=s_star))
    return torch.where(x < s_star, torch.full_like(x, max_weight), inside).to(s.dtype)


def implicit_rewards(
    policy_logps: Tensor, ref_logps: Tensor, mask: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """Token and sequence implicit rewards of docs/design.md §1.

    policy_logps, ref_logps (B, T), mask (B, T) bool → (token_rewards (B, T), 0 where masked;
    sequence_rewards (B,)), ``beta * log pi / pi_ref`` per token and summed over the sequence.
    """
    diff = torch.where(mask, policy_logps - ref_logps, torch.zeros_like(policy_logps))  # (B, T)
    token_rewards = beta * diff  # (B, T)
    return token_rewards, token_rewards.sum(dim=-1)  # (B, T), (B,)


def fdivergence_losses(
    policy_logps: Tensor,
    ref_logps: Tensor,
    mask: Tensor,
    *,
    generator: Generator,
    beta: float,
    granularity: str = "sequence",
    max_weight: float = 10.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-unit losses ``-g(s)`` of docs/design.md §1 (pure function).

    policy_logps, ref_logps (B, T), mask (B, T) bool. A *unit* is a sequence (granularity
    ``sequence``: ``s`` is the sequence implicit reward) or a scored token (``token``: ``s_t`` is
    the token implicit reward).

    Returns ``(losses, units, weights)``: losses (B,) or (B, T), differentiable; units, a bool
    mask of the same shape saying which entries count (sequences with at least one scored token,
    resp. scored tokens); weights ``g'(s)``, detached, same shape. The objective's loss is the
    mean of ``losses`` over ``units``.
    """
    token_rewards, seq_rewards = implicit_rewards(policy_logps, ref_logps, mask, beta)
    if granularity == "sequence":
        s, units = seq_rewards, mask.any(dim=-1)  # (B,), (B,)
    else:
        s, units = token_rewards, mask  # (B, T), (B, T)
    losses = -continued_g(s, generator, max_weight)
    weights = continued_g_prime(s.detach(), generator, max_weight)
    return losses, units, weights


class FDivergenceObjective(DemonstrationObjective):
    """``L_f = -mean g_f(s)`` on demonstrations (docs/design.md §1); subclasses pick ``g_f``.

    Params: ``beta`` (> 0, default 0.1), ``granularity`` (``"sequence"``, default, averages over
    sequences; ``"token"`` averages over scored tokens), ``max_weight`` (> 1, default 10; the cap
    on ``g'`` that sets the safe-domain continuation point ``s*``; unused by ``tv``).
    """

    needs_reference: ClassVar[bool] = True

    def __init__(self, beta: float = 0.1, granularity: str = "sequence", max_weight: float = 10.0) -> None:
        self.beta = check_positive("beta", beta)
        self.granularity = check_choice("granularity", granularity, GRANULARITIES)
        max_weight = check_real("max_weight", max_weight)
        if max_weight <= 1.0:
            raise ValueError(
                f"objective.max_weight must be > 1, got {max_weight!r}: g'(0) = 1 and g' decreases, "
                "so a cap <= 1 would cut the objective at or above the initial policy (s = 0) "
                "(docs/design.md §1, safe domain)"
            )
        self.max_weight = max_weight

    def loss_units(self, mask: Tensor) -> int:
        """Sequences with a scored token (``sequence``) or scored tokens (``token``): what the
        loss is a mean over."""
        return int(mask.any(dim=-1).sum()) if self.granularity == "sequence" else int(mask.sum())

    @property
    def generator(self) -> Generator:
        return GENERATORS[self.name]

    @property
    def s_star(self) -> float | None:
        """Continuation point: ``g`` is linear below it; None for ``tv``."""
        s_star = self.generator.s_star
        return None if s_star is None else s_star(self.max_weight)

    def g(self, s: Tensor) -> Tensor:
        """``g(s)`` with the safe-domain continuation (any shape, differentiable)."""
        return continued_g(s, self.generator, self.max_weight)

    def g_prime(self, s: Tensor) -> Tensor:
        """``g'(s)``, the weight of a unit relative to SFT, capped at ``max_weight``."""
        return continued_g_prime(s, self.generator, self.max_weight)

    def __call__(self, policy_logps: Tensor, ref_logps: Tensor | None, mask: Tensor) -> ObjectiveOutput:
        # policy_logps (B, T) differentiable, ref_logps (B, T) fixed, mask (B, T) bool
        self._check_inputs(policy_logps, ref_logps, mask)
        assert ref_logps is not None
        ref_logps = ref_logps.detach()  # the reference is fixed during a stage
        losses, units, weights = fdivergence_losses(
            policy_logps,
            ref_logps,
            mask,
            generator=self.generator,
            beta=self.beta,
            granularity=self.granularity,
            max_weight=self.max_weight,
        )
        loss = masked_mean(losses, units)
        with torch.no_grad():
            token_rewards, seq_rewards = implicit_rewards(policy_logps, ref_logps, mask, self.beta)
            seqs = mask.any(dim=-1)  # (B,)
            metrics, metric_units = unit_means({
                "implicit/reward": (seq_rewards, seqs),
                "implicit/token_reward": (token_rewards, mask),
                "implicit/weight": (weights, units),  # over the loss's units: sequences or tokens
                "logps/policy": (sequence_logps(policy_logps, mask), seqs),
                "logps/ref": (sequence_logps(ref_logps, mask), seqs),
            })
        return ObjectiveOutput(loss=loss, metrics=metrics, metric_units=metric_units)


class TotalVariation(FDivergenceObjective):
    """``tv``: ``g(s) = s`` — SFT with a constant KL remnant (docs/design.md §1)."""

    name: ClassVar[str] = "tv"


class PearsonChi2(FDivergenceObjective):
    """``chi2`` (alias ``pearson``): ``g(s) = 2(sqrt(1+s) - 1)`` (docs/design.md §1)."""

    name: ClassVar[str] = "chi2"
    aliases: ClassVar[tuple[str, ...]] = ("pearson",)


class SquaredHellinger(FDivergenceObjective):
    """``hellinger``: ``g(s) = s / (1+s)`` (docs/design.md §1)."""

    name: ClassVar[str] = "hellinger"


class JensenShannon(FDivergenceObjective):
    """``jsd`` (f-GAN form): ``g(s) = log(2 - e^-s)`` (docs/design.md §1)."""

    name: ClassVar[str] = "jsd"


class ReverseKL(FDivergenceObjective):
    """``rkl``: ``g(s) = 1 - e^-s`` (docs/design.md §1)."""

    name: ClassVar[str] = "rkl"


FORWARD_KL_NAMES = ("forward_kl", "fkl", "kl", "forward-kl", "forwardkl")
FORWARD_KL_REASON = (
    "forward KL is not usable as an SFT objective (docs/design.md §1): with f(u) = u log u, "
    "g(s) = 1 + log s is defined only for s > 0, so the initial policy (pi = pi_ref, s = 0) "
    "lies on the boundary of its domain, where g = -inf and g' = +inf; use rkl, jsd, hellinger "
    "or chi2 instead"
)
