"""Plain SFT: token-averaged cross-entropy on demonstrations (docs/design.md §1).

docs/design.md §1 shows that SFT is the Total-Variation member of the f-divergence family: ``tv`` at
token granularity with ``beta = 1`` has exactly this gradient (the losses differ by the constant
``mean_t log pi_ref``). This objective needs no reference model.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from .base import DemonstrationObjective, ObjectiveOutput, masked_mean, unit_means
from .logprobs import sequence_logps


def sft_loss(policy_logps: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``-log pi`` over the batch's scored tokens / number of scored tokens (scalar).

    policy_logps (B, T), mask (B, T) bool.
    """
    return masked_mean(-policy_logps, mask)


class SFT(DemonstrationObjective):
    """Token-averaged negative log-likelihood of the demonstrations (the usual SFT loss)."""

    name: ClassVar[str] = "sft"
    needs_reference: ClassVar[bool] = False

    def __init__(self) -> None:
        pass

    def __call__(self, policy_logps: Tensor, ref_logps: Tensor | None, mask: Tensor) -> ObjectiveOutput:
        # policy_logps (B, T), mask (B, T); ref_logps is ignored (may be None)
        self._check_inputs(policy_logps, ref_logps, mask)
        loss = sft_loss(policy_logps, mask)
        seq = sequence_logps(policy_logps, mask).detach()  # (B,)
        metrics, units = unit_means({
            "logps/policy": (seq, mask.any(dim=-1)),  # over sequences
            "train/nll_per_token": (-policy_logps, mask),  # over scored tokens: the loss's value
        })
        return ObjectiveOutput(loss=loss, metrics=metrics, metric_units=units)
