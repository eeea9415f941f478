"""SFT-family losses with a full-vocabulary KL anchor: ``sft_kl`` and ``asft`` (docs/objectives.md).

Per scored token ``t`` (demonstration prefix ``s_t``), averaged over the scored tokens::

    sft_kl:  -log p_t           + kl_coef · KL_t
    asft:    -sg(p_t) · log p_t + kl_coef · KL_t          (dft plus the anchor)

with ``KL_t`` the exact KL between the policy's and the reference's next-token distributions
at ``s_t`` (``vocab_divergence.py``), in the direction ``kl_direction``:

* ``policy_ref`` (``sft_kl``'s default): KL(pi(.|s_t) || pi_ref(.|s_t)) — docs/design.md §1's
  anchor, taken per prefix, and what ``kl/token`` measures; the ASFT paper (Zhu et al., arXiv
  2509.23753) writes its anchor in this direction, as far as the public record shows (Unsloth's
  port, ``unsloth/losses/asft.py``, says so).
* ``ref_policy`` (``asft``'s default, so that ``objective=asft`` is the published method):
  KL(pi_ref(.|s_t) || pi(.|s_t)) — what ASFT's released code computes:
  github.com/zhuchichi56/ASFT ``train_v2.py`` (``EnhancedTrainer.compute_loss``, modes
  ``sft+kl`` and ``asft``: ``F.kl_div(F.log_softmax(logits), F.softmax(ref_logits))``, i.e.
  ``sum q (log q - log p)``, added to the token losses with ``kl_weight`` and averaged over
  the valid tokens); LLaMA-Factory's ``asft_loss_func`` does the same.

``kl_coef`` defaults to 0.05, the value of the ASFT README's training command ("Train an ASFT
model with default settings"); ``train_v2.py``'s argument default is 0.1. ``sft_kl`` is ASFT's
``sft+kl`` ablation and this project's direct control for "does keeping the KL term alive
help?": plain SFT plus the anchor, the same ``kl_coef`` default as ``asft``.

Implicit-reward reading (docs/design.md §1): ``max_pi E[r] - lambda KL(pi || pi_ref)`` is solved by
``pi ∝ pi_ref e^{r/lambda}``, so the reward these objectives imply is
``lambda · log pi/pi_ref``: the ``implicit/*`` metrics use ``beta = kl_coef``. Unlike the
f-divergences, whose anchor acts only through the demonstrated tokens' log-ratios, the KL
here pulls the whole next-token distribution at every prefix towards pi_ref.

Cost: a reference forward per micro-batch (the cached per-token log-probs do not carry the
distribution over the vocabulary), a frozen reference model kept in memory for the stage, and
the chunked KL; ``benchmarks/bench_objectives.py`` measures it (docs/objectives.md).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import DemonstrationObjective, ObjectiveOutput, check_choice, check_real, masked_mean
from .probability import dft_token_losses, token_objective_metrics
from .vocab_divergence import KL_DIRECTIONS, vocab_kl


def prefix_kl(logits: Tensor, ref_logits: Tensor, mask: Tensor, direction: str) -> Tensor:
    """KL between the two models' next-token distributions at each scored prefix.

    logits, ref_logits (B, T+1, V) over ``input_ids`` (B, T+1); mask (B, T) bool as returned by
    ``token_logps`` (position ``t`` scores the token predicted by the logits at ``t``).
    Returns (B, T) float32, 0 where not scored; differentiable in ``logits``.
    """
    batch, steps = mask.shape
    if logits.dim() != 3 or logits.shape[:2] != (batch, steps + 1):
        raise ValueError(
            f"expected logits (B, T+1, V) for a mask (B, T) = {tuple(mask.shape)}; got {tuple(logits.shape)}"
        )
    where = torch.cat([mask, mask.new_zeros(batch, 1)], dim=1)  # (B, T+1): the last position predicts nothing
    return vocab_kl(logits, ref_logits, where, direction)[:, :-1]  # (B, T)


class _Anchored(DemonstrationObjective):
    """Token losses plus ``kl_coef`` x the per-prefix KL to the reference, token-averaged."""

    needs_reference: ClassVar[bool] = True  # cached log pi_ref at the tokens, for implicit/*
    needs_reference_logits: ClassVar[bool] = True

    def __init__(self, kl_coef: float = 0.05, kl_direction: str = "policy_ref") -> None:
        kl_coef = check_real("kl_coef", kl_coef)
        if kl_coef < 0:
            raise ValueError(f"objective.kl_coef must be >= 0 (the weight of the KL anchor), got {kl_coef!r}")
        self.kl_coef = kl_coef
        self.kl_direction = check_choice("kl_direction", kl_direction, KL_DIRECTIONS)

    def _token_losses(self, policy_logps: Tensor) -> Tensor:
        raise NotImplementedError

    def _token_weights(self, policy_logps: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(
        self,
        policy_logps: Tensor,
        ref_logps: Tensor | None,
        mask: Tensor,
        *,
        logits: Tensor | None = None,
        ref_logits: Tensor | None = None,
    ) -> ObjectiveOutput:
        # policy_logps (B, T) differentiable, ref_logps (B, T) fixed, mask (B, T) bool;
        # logits (B, T+1, V) differentiable, ref_logits (B, T+1, V) fixed
        self._check_inputs(policy_logps, ref_logps, mask)
        assert ref_logps is not None
        if logits is None or ref_logits is None:
            raise ValueError(
                f"objective '{self.name}' needs the policy's and the reference's logits (logits=, ref_logits=): "
                "its KL anchor is over the whole vocabulary"
            )
        kl = prefix_kl(logits, ref_logits, mask, self.kl_direction)  # (B, T)
        loss = masked_mean(self._token_losses(policy_logps) + self.kl_coef * kl, mask)
        weights = self._token_weights(policy_logps.detach())
        metrics, units = token_objective_metrics(policy_logps, ref_logps, mask, weights, beta=self.kl_coef)
        metrics["kl/anchor"] = masked_mean(kl.detach(), mask)
        units["kl/anchor"] = mask.sum()  # over scored prefixes
        return ObjectiveOutput(loss=loss, metrics=metrics, metric_units=units)


class SFTKL(_Anchored):
    """``sft_kl``: token-averaged ``-log p_t + kl_coef · KL_t`` (ASFT's ``sft+kl`` mode,
    github.com/zhuchichi56/ASFT ``train_v2.py``)."""

    name: ClassVar[str] = "sft_kl"

    def _token_losses(self, policy_logps: Tensor) -> Tensor:
        return -policy_logps

    def _token_weights(self, policy_logps: Tensor) -> Tensor:
        return torch.ones_like(policy_logps)


class ASFT(_Anchored):
    """``asft``: Anchored SFT (arXiv 2509.23753), token-averaged ``-sg(p_t) log p_t + kl_coef · KL_t``
    with KL_t = KL(pi_ref || pi) by default (github.com/zhuchichi56/ASFT ``train_v2.py``, mode ``asft``)."""

    name: ClassVar[str] = "asft"

    def __init__(self, kl_coef: float = 0.05, kl_direction: str = "ref_policy") -> None:
        super().__init__(kl_coef, kl_direction)  # the released code's direction (module docstring)

    def _token_losses(self, policy_logps: Tensor) -> Tensor:
        return dft_token_losses(policy_logps)

    def _token_weights(self, policy_logps: Tensor) -> Tensor:
        return policy_logps.exp()
