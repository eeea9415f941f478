"""Probability-reweighted SFT: ``dft`` and the ``prior_leaning`` family (docs/objectives.md).

Both are token-averaged losses on the demonstration tokens' probabilities
``p_t = pi(a_t | s_t)``, pure functions of the per-token log-probs:

* ``dft`` — Dynamic Fine-Tuning (Wu et al., arXiv 2508.05629): ``-sg(p_t) · log p_t``, the
  cross-entropy of each token weighted by its own (detached) probability. Checked against
  github.com/yongliang-wu/DFT, ``verl/verl/trainer/fsdp_dft_trainer.py``
  (``_compute_loss_and_backward``: ``loss * probs.gather(...).detach()``, summed over the loss
  mask and divided by its number of tokens).
* ``prior_leaning`` — the family ``f_alpha(p) = (1 - p^alpha) / alpha`` of Li et al., "Beyond
  Log Likelihood" (arXiv 2510.00526); ``alpha -> 0`` is NLL, ``alpha = 1`` is ``1 - p`` (``-p``
  up to a constant). Checked against github.com/GaotangLi/Beyond-Log-Likelihood,
  ``main_verl/trainer/fsdp_sft_trainer.py`` (``objective_trans=GeneralFamily-<alpha>``:
  ``-(exp(alpha * log_p) - 1) / alpha``, token-averaged as in verl's SFT trainer).

Gradients: ``d/d log p_t`` of the ``dft`` loss is ``-p_t`` and of ``f_alpha`` is ``-p_t^alpha``,
so each token gets ``p_t^alpha`` times its SFT weight (``dft``: ``alpha = 1``). ``dft`` and
``prior_leaning(alpha=1)`` therefore have the same gradient: ``sg(p) ∇log p = ∇p``.

Implicit-reward reading (docs/design.md §1): with ``s_t = log pi/pi_ref`` at the token,
``p_t = pi_ref(a_t|s_t) e^{s_t}``, so the weight ``p_t^alpha`` *grows* with the implicit reward —
the opposite of the f-divergences, whose concave ``g`` down-weights tokens the policy already
favours. There is no anchor: nothing pulls the policy back towards pi_ref.

Both need ``log pi_ref`` only for the ``implicit/*`` metrics (the loss ignores it): the cached
reference pass, as the f-divergences use. The metrics' implicit rewards are unscaled
log-ratios (``beta = 1``): these objectives have no KL coefficient to scale them by.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import DemonstrationObjective, ObjectiveOutput, check_real, masked_mean, unit_means
from .fdivergence import implicit_rewards
from .logprobs import sequence_logps


def dft_token_losses(policy_logps: Tensor) -> Tensor:
    """``-sg(p_t) · log p_t`` per token (any shape); differentiable through ``log p_t`` only."""
    return -policy_logps.detach().exp() * policy_logps


def prior_leaning_token_losses(policy_logps: Tensor, alpha: float) -> Tensor:
    """``(1 - p^alpha) / alpha`` per token (any shape), ``-log p`` at ``alpha = 0``.

    Written ``-expm1(alpha · log p) / alpha``: exact for small ``alpha`` (no cancellation in
    ``1 - p^alpha``), and never evaluates ``p`` itself, which underflows for rare tokens.
    """
    if alpha == 0.0:
        return -policy_logps
    return -torch.expm1(alpha * policy_logps) / alpha


def token_objective_metrics(
    policy_logps: Tensor, ref_logps: Tensor, mask: Tensor, weights: Tensor, beta: float
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The metrics every demonstration objective logs (docs/objectives.md, "Logged metrics").

    All inputs (B, T) (mask bool); ``weights`` the per-token weight relative to SFT's gradient.
    ``implicit/reward`` is ``beta · Σ_t log pi/pi_ref`` averaged over sequences. Returns the
    metrics and their units (sequences or scored tokens; `unit_means`).
    """
    with torch.no_grad():
        policy_logps, ref_logps = policy_logps.detach(), ref_logps.detach()
        token_rewards, seq_rewards = implicit_rewards(policy_logps, ref_logps, mask, beta)
        seqs = mask.any(dim=-1)  # (B,)
        return unit_means({
            "implicit/reward": (seq_rewards, seqs),
            "implicit/token_reward": (token_rewards, mask),
            "implicit/weight": (weights, mask),
            "logps/policy": (sequence_logps(policy_logps, mask), seqs),
            "logps/ref": (sequence_logps(ref_logps, mask), seqs),
            "train/nll_per_token": (-policy_logps, mask),
        })


class _TokenObjective(DemonstrationObjective):
    """A token-averaged demonstration objective needing the cached ``log pi_ref`` for metrics."""

    needs_reference: ClassVar[bool] = True

    def _token_losses(self, policy_logps: Tensor) -> Tensor:
        raise NotImplementedError

    def _token_weights(self, policy_logps: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, policy_logps: Tensor, ref_logps: Tensor | None, mask: Tensor) -> ObjectiveOutput:
        # policy_logps (B, T) differentiable, ref_logps (B, T) fixed, mask (B, T) bool
        self._check_inputs(policy_logps, ref_logps, mask)
        assert ref_logps is not None
        loss = masked_mean(self._token_losses(policy_logps), mask)
        weights = self._token_weights(policy_logps.detach())
        metrics, units = token_objective_metrics(policy_logps, ref_logps, mask, weights, beta=1.0)
        return ObjectiveOutput(loss=loss, metrics=metrics, metric_units=units)


class DFT(_TokenObjective):
    """``dft``: Dynamic Fine-Tuning, mean over scored tokens of ``-sg(p_t) log p_t``
    (arXiv 2508.05629; github.com/yongliang-wu/DFT ``verl/verl/trainer/fsdp_dft_trainer.py``)."""

    name: ClassVar[str] = "dft"

    def __init__(self) -> None:
        pass

    def _token_losses(self, policy_logps: Tensor) -> Tensor:
        return dft_token_losses(policy_logps)

    def _token_weights(self, policy_logps: Tensor) -> Tensor:
        return policy_logps.exp()


class PriorLeaning(_TokenObjective):
    """``prior_leaning``: mean over scored tokens of ``(1 - p_t^alpha) / alpha``
    (arXiv 2510.00526; github.com/GaotangLi/Beyond-Log-Likelihood
    ``main_verl/trainer/fsdp_sft_trainer.py``, ``GeneralFamily-<alpha>``).

    ``alpha`` >= 0 (default 1: the ``-p`` objective, DFT's gradient); 0 is NLL (``sft``).
    Negative ``alpha`` (the paper's prior-averse side) is refused: its weight ``p^alpha``
    is unbounded as ``p -> 0``.
    """

    name: ClassVar[str] = "prior_leaning"

    def __init__(self, alpha: float = 1.0) -> None:
        alpha = check_real("alpha", alpha)
        if alpha < 0:
            raise ValueError(
                f"objective.alpha must be >= 0 (0: NLL, 1: -p, larger: more prior-leaning), got {alpha!r}; "
                "a negative alpha weighs each token by p^alpha, unbounded as p -> 0"
            )
        self.alpha = alpha

    def _token_losses(self, policy_logps: Tensor) -> Tensor:
        return prior_leaning_token_losses(policy_logps, self.alpha)

    def _token_weights(self, policy_logps: Tensor) -> Tensor:
        return (self.alpha * policy_logps).exp()
