"""Preference objectives for stage 2: DPO and its cheap relatives (docs/design.md §1, "DPO").

All take per-sequence log-probs (B,) of the chosen and rejected responses under the policy and
the (fixed, precomputed) reference, and work with the sequence log-ratios
``rho = log pi(y|x) - log pi_ref(y|x)``, so that ``beta * rho`` is the implicit reward of
docs/design.md §1 and ``h = rho_chosen - rho_rejected`` its margin over ``beta``.

* ``dpo``: ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``; ``eps`` =
  ``label_smoothing`` (0 by default: plain DPO; > 0: conservative DPO, as TRL's sigmoid loss).
* ``cdpo``: the same with ``label_smoothing = 0.1`` by default.
* ``ipo``: ``(h - 1 / (2 beta))^2``. TRL's ``ipo`` averages log-probs over tokens before forming
  ``h``; here ``h`` uses summed sequence log-probs, the quantity the implicit reward is made of,
  so ``beta`` values do not transfer one-to-one from TRL's IPO.

The loss is the mean over pairs. Metric keys follow TRL.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ObjectiveOutput, PreferenceObjective, check_positive, check_real, unit_means


def _log_ratios(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor
) -> tuple[Tensor, Tensor]:
    # each (B,) → rho_chosen, rho_rejected (B,); the reference is fixed during a stage
    return policy_chosen - ref_chosen.detach(), policy_rejected - ref_rejected.detach()


def dpo_losses(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sigmoid DPO loss with cDPO label smoothing (pure function).

    Inputs (B,) each. Returns ``(losses (B,), chosen_rewards (B,), rejected_rewards (B,))``,
    rewards ``beta * rho`` detached.
    """
    rho_c, rho_r = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    logits = beta * (rho_c - rho_r)  # (B,)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, (beta * rho_c).detach(), (beta * rho_r).detach()


def ipo_losses(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """IPO loss ``(h - 1/(2 beta))^2`` on summed sequence log-ratios (pure function).

    Inputs (B,) each. Returns ``(losses (B,), chosen_rewards (B,), rejected_rewards (B,))``.
    """
    rho_c, rho_r = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = (rho_c - rho_r - 1.0 / (2.0 * beta)) ** 2  # (B,)
    return losses, (beta * rho_c).detach(), (beta * rho_r).detach()


def preference_metrics(
    chosen_rewards: Tensor, rejected_rewards: Tensor, policy_chosen: Tensor, policy_rejected: Tensor
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """TRL-style metrics, detached scalars, each a mean over the batch's pairs, and their units
    (the number of pairs; `unit_means`); all inputs (B,)."""
    pairs = torch.ones_like(chosen_rewards, dtype=torch.bool)
    return unit_means({
        "rewards/chosen": (chosen_rewards, pairs),
        "rewards/rejected": (rejected_rewards, pairs),
        "rewards/margins": (chosen_rewards - rejected_rewards, pairs),
        "rewards/accuracies": ((chosen_rewards > rejected_rewards).float(), pairs),
        "logps/chosen": (policy_chosen, pairs),
        "logps/rejected": (policy_rejected, pairs),
    })


class DPO(PreferenceObjective):
    """``dpo``: sigmoid loss; ``label_smoothing`` in [0, 0.5) gives conservative DPO."""

    name: ClassVar[str] = "dpo"

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0) -> None:
        self.beta = check_positive("beta", beta)
        label_smoothing = check_real("label_smoothing", label_smoothing)
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(
                f"objective.label_smoothing must be in [0, 0.5) (the assumed share of flipped "
                f"preference labels), got {label_smoothing!r}"
            )
        self.label_smoothing = label_smoothing

    def __call__(
        self, policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor
    ) -> ObjectiveOutput:
        # each (B,) sequence log-probs
        self._check_inputs(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
        losses, chosen_rewards, rejected_rewards = dpo_losses(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
        )
        metrics, units = preference_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
        return ObjectiveOutput(loss=losses.mean(), metrics=metrics, metric_units=units)


class CDPO(DPO):
    """``cdpo``: conservative DPO, ``dpo`` with ``label_smoothing = 0.1`` by default."""

    name: ClassVar[str] = "cdpo"

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.1) -> None:
        super().__init__(beta=beta, label_smoothing=label_smoothing)


class IPO(PreferenceObjective):
    """``ipo``: squared loss pulling the log-ratio margin to ``1 / (2 beta)``."""

    name: ClassVar[str] = "ipo"

    def __init__(self, beta: float = 0.1) -> None:
        self.beta = check_positive("beta", beta)

    def __call__(
        self, policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor
    ) -> ObjectiveOutput:
        # each (B,) sequence log-probs
        self._check_inputs(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
        losses, chosen_rewards, rejected_rewards = ipo_losses(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=self.beta
        )
        metrics, units = preference_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
        return ObjectiveOutput(loss=losses.mean(), metrics=metrics, metric_units=units)
