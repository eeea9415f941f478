"""Training objectives: pure functions of log-prob tensors and a registry (docs/design.md §1, §4).

Use::

    from ibridge.objectives import build_objective, token_logps, sequence_logps

    obj = build_objective({"name": "jsd", "beta": 0.1, "granularity": "sequence"})
    logps, mask = token_logps(logits, labels)            # (B, T-1), (B, T-1)
    out = obj(logps, ref_logps, mask)                    # demonstrations
    out.loss.backward(); log(out.metrics)

Objectives: ``sft``; the f-divergence family ``tv``, ``chi2`` (alias ``pearson``), ``hellinger``,
``jsd``, ``rkl``; beside the paper, ``dft``, ``prior_leaning``, ``sft_kl`` and ``asft``
(demonstrations); ``dpo``, ``cdpo``, ``ipo`` (preferences). Forward KL is refused with the
reason (docs/design.md §1). The trainer asks an objective for ``data_kind``, ``needs_reference`` and
``needs_reference_logits`` instead of testing names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .anchored import ASFT, SFTKL, prefix_kl
from .base import (
    DEMONSTRATIONS,
    PREFERENCES,
    DemonstrationObjective,
    Objective,
    ObjectiveOutput,
    PreferenceObjective,
)
from .fdivergence import (
    FORWARD_KL_NAMES,
    FORWARD_KL_REASON,
    GENERATORS,
    FDivergenceObjective,
    JensenShannon,
    PearsonChi2,
    ReverseKL,
    SquaredHellinger,
    TotalVariation,
    fdivergence_losses,
    implicit_rewards,
)
from .logprobs import label_logps, sequence_logps, token_logps
from .preference import CDPO, DPO, IPO, dpo_losses, ipo_losses
from .probability import DFT, PriorLeaning, dft_token_losses, prior_leaning_token_losses
from .sft import SFT, sft_loss
from .vocab_divergence import KL_DIRECTIONS, vocab_kl

__all__ = [
    "ASFT",
    "CDPO",
    "DEMONSTRATIONS",
    "DFT",
    "DPO",
    "GENERATORS",
    "IPO",
    "KL_DIRECTIONS",
    "OBJECTIVES",
    "PREFERENCES",
    "SFT",
    "SFTKL",
    "DemonstrationObjective",
    "FDivergenceObjective",
    "JensenShannon",
    "Objective",
    "ObjectiveOutput",
    "PearsonChi2",
    "PreferenceObjective",
    "PriorLeaning",
    "ReverseKL",
    "SquaredHellinger",
    "TotalVariation",
    "available_objectives",
    "build_objective",
    "canonical_name",
    "data_kind_of",
    "dft_token_losses",
    "dpo_losses",
    "fdivergence_losses",
    "implicit_rewards",
    "ipo_losses",
    "label_logps",
    "prefix_kl",
    "prior_leaning_token_losses",
    "sequence_logps",
    "sft_loss",
    "token_logps",
    "vocab_kl",
]

_CLASSES: tuple[type[Objective], ...] = (
    SFT,
    TotalVariation,
    PearsonChi2,
    SquaredHellinger,
    JensenShannon,
    ReverseKL,
    DFT,
    PriorLeaning,
    SFTKL,
    ASFT,
    DPO,
    CDPO,
    IPO,
)

#: name → class, canonical names and aliases (``pearson`` → ``PearsonChi2``).
OBJECTIVES: dict[str, type[Objective]] = {}
for _cls in _CLASSES:
    for _name in (_cls.name, *_cls.aliases):
        OBJECTIVES[_name] = _cls


def available_objectives() -> list[str]:
    """Sorted canonical names (aliases left out)."""
    return sorted(cls.name for cls in _CLASSES)


def canonical_name(name: str) -> str:
    """Canonical name of an objective or alias; ValueError for forward KL or an unknown name."""
    if not isinstance(name, str):
        raise ValueError(f"objective.name must be a string, got {name!r}")
    key = name.strip().lower()
    if key in FORWARD_KL_NAMES:
        raise ValueError(f"objective.name={name!r}: {FORWARD_KL_REASON}")
    if key not in OBJECTIVES:
        aliases = ", ".join(f"{a} → {cls.name}" for a, cls in sorted(OBJECTIVES.items()) if a != cls.name)
        raise ValueError(
            f"unknown objective.name={name!r}; valid names: {', '.join(available_objectives())}"
            + (f" (aliases: {aliases})" if aliases else "")
        )
    return OBJECTIVES[key].name


def data_kind_of(name: str) -> str:
    """``"demonstrations"`` or ``"preferences"``: which data the objective trains on."""
    return OBJECTIVES[canonical_name(name)].data_kind


def build_objective(cfg: Mapping[str, Any]) -> Objective:
    """Build an objective from a mapping with ``name`` plus its params (e.g. a DictConfig).

    Unknown names and params, and bad values, raise ValueError naming the ``objective.*`` key
    and what was expected.
    """
    if not isinstance(cfg, Mapping) or "name" not in cfg:
        raise ValueError(f"objective config must be a mapping with a 'name' key, got {cfg!r}")
    cls = OBJECTIVES[canonical_name(cfg["name"])]
    params = {str(k): v for k, v in cfg.items() if k != "name"}
    valid = cls.param_names()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown parameter{'s' if len(unknown) > 1 else ''} "
            f"{', '.join('objective.' + k for k in unknown)} for objective '{cls.name}'; valid "
            f"parameters: {', '.join(valid) if valid else 'none (it takes no parameters)'}"
        )
    return cls(**params)
