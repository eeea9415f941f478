"""Common interface of the training objectives (docs/design.md §1 and §4).

An objective is a small immutable object holding its hyper-parameters; calling it is a pure
function of log-prob tensors (no state is mutated, nothing is cached). Two signature families:

* demonstrations (SFT and the f-divergence family of docs/design.md §1)::

      obj(policy_logps, ref_logps, mask) -> ObjectiveOutput
      # policy_logps (B, T) per-token log pi, differentiable
      # ref_logps    (B, T) per-token log pi_ref, fixed (or None if not needs_reference)
      # mask         (B, T) bool, True at scored (demonstration) tokens

  Objectives with ``needs_reference_logits`` (``sft_kl``, ``asft``) also take the keyword
  arguments ``logits`` (B, T+1, V), the policy's logits the log-probs came from, and
  ``ref_logits`` (B, T+1, V), the reference's on the same batch (``anchored.py``).

* preferences (DPO and relatives)::

      obj(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> ObjectiveOutput
      # each (B,) sequence log-probs, see ``logprobs.sequence_logps``

Log-prob extraction (shift by one, ``-100`` masking) lives in ``logprobs.py``, not here.
"""

from __future__ import annotations

import abc
import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

DEMONSTRATIONS = "demonstrations"
PREFERENCES = "preferences"


@dataclass
class ObjectiveOutput:
    """What an objective returns.

    loss: scalar, differentiable; the quantity to minimise for this batch.
    metrics: detached scalar tensors keyed as in the field (``rewards/chosen``, ``logps/policy``,
        ``implicit/reward``, ...), each a mean over its own units (pairs, sequences or scored
        tokens). Kept as tensors so that the trainer decides when to sync.
    metric_units: for every key of ``metrics``, how many units its mean is over in this batch
        (a scalar tensor or int). The trainer weighs each micro-batch's value by it, so that a
        logged metric is its mean over all the units of the window, on every rank, as the
        loss is (ibridge/batching.py; `unit_means` builds both dicts).
    """

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    metric_units: dict[str, Tensor | int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = sorted(set(self.metrics) - set(self.metric_units))
        if missing:
            raise ValueError(f"ObjectiveOutput: metric(s) {', '.join(missing)} have no metric_units "
                             "(how many units each mean is over; see objectives.base.unit_means)")


class Objective(abc.ABC):
    """Base class of every objective; subclasses set the three class attributes below.

    Hyper-parameters are keyword arguments of ``__init__``; they are validated there (errors name
    the config key ``objective.<param>``) and exposed by ``params()``.
    """

    name: ClassVar[str]
    data_kind: ClassVar[str]  # DEMONSTRATIONS or PREFERENCES
    needs_reference: ClassVar[bool]  # whether reference log-probs must be provided
    # Whether the objective also needs the reference's full next-token distribution at every
    # scored position (a reference forward per micro-batch): then it is called with the
    # keyword arguments ``logits`` and ``ref_logits`` too (``anchored.py``).
    needs_reference_logits: ClassVar[bool] = False
    aliases: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def param_names(cls) -> tuple[str, ...]:
        """Names of the keyword hyper-parameters accepted by this objective."""
        sig = inspect.signature(cls.__init__)
        return tuple(p.name for p in sig.parameters.values() if p.name != "self")

    def params(self) -> dict[str, Any]:
        """Current hyper-parameter values, for logging."""
        return {k: getattr(self, k) for k in self.param_names()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"

    @abc.abstractmethod
    def __call__(self, *tensors: Tensor | None) -> ObjectiveOutput: ...


class DemonstrationObjective(Objective):
    """Objective on demonstrations: ``obj(policy_logps, ref_logps, mask)``, all (B, T)."""

    data_kind: ClassVar[str] = DEMONSTRATIONS

    @abc.abstractmethod
    def __call__(self, policy_logps: Tensor, ref_logps: Tensor | None, mask: Tensor) -> ObjectiveOutput: ...

    def loss_units(self, mask: Tensor) -> int:
        """How many units the loss of a batch with this (B, T) mask is a mean over: its scored
        tokens here (token-averaged objectives). The trainer weighs micro-batches by it so that
        a step's loss is the mean over all of its units (ibridge/batching.py)."""
        return int(mask.sum())

    def _check_inputs(self, policy_logps: Tensor, ref_logps: Tensor | None, mask: Tensor) -> None:
        if policy_logps.dim() != 2 or mask.shape != policy_logps.shape:
            raise ValueError(
                f"{self.name}: expected policy_logps and mask of the same shape (B, T); got "
                f"{tuple(policy_logps.shape)} and {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool:
            raise ValueError(f"{self.name}: mask must be a bool tensor, got {mask.dtype}")
        if self.needs_reference:
            if ref_logps is None:
                raise ValueError(f"objective '{self.name}' needs reference log-probs (ref_logps), got None")
            if ref_logps.shape != policy_logps.shape:
                raise ValueError(
                    f"{self.name}: ref_logps {tuple(ref_logps.shape)} does not match policy_logps "
                    f"{tuple(policy_logps.shape)}"
                )


class PreferenceObjective(Objective):
    """Objective on preference pairs: ``obj(policy_chosen, policy_rejected, ref_chosen,
    ref_rejected)``, each (B,) sequence log-probs."""

    data_kind: ClassVar[str] = PREFERENCES
    needs_reference: ClassVar[bool] = True

    @abc.abstractmethod
    def __call__(
        self, policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor
    ) -> ObjectiveOutput: ...

    def loss_units(self, n_pairs: int) -> int:
        """The loss is a mean over pairs (see ``DemonstrationObjective.loss_units``)."""
        return int(n_pairs)

    def _check_inputs(self, *tensors: Tensor) -> None:
        shapes = [tuple(t.shape) for t in tensors]
        if len(shapes[0]) != 1 or any(s != shapes[0] for s in shapes):
            raise ValueError(
                f"{self.name}: expected four (B,) sequence log-prob tensors (policy_chosen, "
                f"policy_rejected, ref_chosen, ref_rejected); got shapes {shapes}"
            )


# ---------------------------------------------------------------------------------------------
# Validation helpers: errors name the config key so that a user knows what to override.


def check_real(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"objective.{key} must be a finite number, got {value!r}")
    return float(value)


def check_positive(key: str, value: Any) -> float:
    value = check_real(key, value)
    if value <= 0:
        raise ValueError(f"objective.{key} must be > 0, got {value!r}")
    return value


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"objective.{key} must be one of {', '.join(choices)}; got {value!r}")
    return value


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over ``mask`` (same shape); 0 when the mask is empty.

    Uses where rather than indexing so that masked entries never reach the gradient, even if they
    hold inf or NaN.
    """
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1).to(values.dtype)


def unit_means(columns: dict[str, tuple[Tensor, Tensor]]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``{key: (values, mask)}`` (same shapes, mask bool) -> ``(metrics, metric_units)``: each
    key's detached mean over its mask and the mask's count, for `ObjectiveOutput`. A metric
    over pairs or sequences passes a (B,) mask, one over scored tokens the (B, T) token mask."""
    with torch.no_grad():
        metrics = {key: masked_mean(values.detach(), mask) for key, (values, mask) in columns.items()}
        units = {key: mask.sum() for key, (_, mask) in columns.items()}
    return metrics, units
