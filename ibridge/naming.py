"""Run names that say the overrides, and the cell's swept axes (docs/design.md §3).

A pipeline's wandb runs are named ``<kind>-<cell tag>``: ``sft-jsd-lr1e-4-s0``,
``eval-dpo-jsd-lr1e-4-s0``, ``cell-jsd-lr1e-4-s0``. The tag holds the SFT objective,
lr and seed (for ``train`` of a preference stage, its objective and ``dpo.lr``), then every other override on the command line that changes what a
run computes (``base1`` for ``model.pretrain.seed=1``, ``dpo.lr5e-4``, ``key=value``
otherwise), so the runs of a sweep's cells never share a name.
"""

from __future__ import annotations

from pathlib import PurePath

from omegaconf import OmegaConf

# Overrides the tag spells already, or that do not change what a run computes (with their sub-keys).
SPELLED = ("objective", "lr", "seed", "job", "resume", "output_dir")
NOT_IN_TAG = ("debug", "hydra", "logger", "trainer", "report", "dashboard", "model.cache_dir", "eval.batch_size")


def fmt_lr(lr) -> str:
    """``1e-4``, ``5e-4``, ``2.5e-5``: short, exact, sorts no worse than ``0.0001``."""
    try:
        value = float(lr)
    except (TypeError, ValueError):
        return str(lr)
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _short(key: str, value: str) -> str:
    key = key.lstrip("+~")
    if key == "model.pretrain.seed":
        return f"base{value}"
    if key == "dpo.lr":
        return f"dpo.lr{fmt_lr(value)}"
    if "/" in value:  # a path: its last informative part
        parts = [p for p in PurePath(value).parts if p not in ("checkpoint", "/")]
        value = parts[-1] if parts else value
    return f"{key}={value}"


def in_tag(key: str) -> bool:
    """Whether an override of `key` is spelled out in the tag (``objective.beta``: yes; ``logger.mode``: no)."""
    key = key.lstrip("+~")
    if key in SPELLED:
        return False
    return not any(key == prefix or key.startswith((f"{prefix}.", f"{prefix}/")) for prefix in NOT_IN_TAG)


def cell_tag(cfg, overrides: list[str]) -> str:
    """``jsd-lr1e-4-s0`` plus the other overrides that change the result.

    For `eval` and `qlogit`, which train nothing, the checkpoint replaces objective and lr:
    ``base-s0``, ``sft-s0`` (the checkpoint's folder, less a trailing ``checkpoint``).
    """
    skip = ()
    if OmegaConf.select(cfg, "job", default="pipeline") in ("eval", "qlogit"):
        checkpoint = OmegaConf.select(cfg, "checkpoint", default=None)
        parts = [_short("checkpoint", str(checkpoint)).split("=", 1)[1] if checkpoint else "base", f"s{cfg.seed}"]
        skip = ("checkpoint",)
    else:
        objective = OmegaConf.select(cfg, "objective.name", default="?")
        lr = OmegaConf.select(cfg, "lr", default="?")
        if OmegaConf.select(cfg, "job", default="pipeline") == "train" and _trains_preferences(cfg):
            lr, skip = OmegaConf.select(cfg, "dpo.lr", default="?"), ("dpo.lr",)  # the stage's own lr
        parts = [str(objective), f"lr{fmt_lr(lr)}", f"s{cfg.seed}"]
    for override in overrides:
        if "=" not in override:
            continue
        key, value = override.split("=", 1)
        if in_tag(key) and key.lstrip("+~") not in skip:
            parts.append(_short(key, value))
    return "-".join(parts)


def _trains_preferences(cfg) -> bool:
    """Whether `train` runs a preference stage (its lr is ``dpo.lr``: ibridge/stage_settings.py)."""
    from ibridge.stage_settings import trained_stage

    try:
        return trained_stage(cfg) == "dpo"
    except (ValueError, KeyError, AttributeError):  # an unknown objective: validation names it
        return False


def base_seed(cfg) -> int | None:
    """The seed the base model was pretrained with: ``model.pretrain.seed``, else the world's."""
    seed = OmegaConf.select(cfg, "model.pretrain.seed", default=None)
    if seed is None:
        seed = OmegaConf.select(cfg, "data.world.seed", default=None)
    return None if seed is None else int(seed)


def cell_axes(cfg) -> dict:
    """The cell run's config: the swept axes at the top level, then the rest of the config.

    ``objective`` and ``dpo.objective`` are names here (their settings move to
    ``objective_settings`` / ``dpo.objective_settings``), so a dashboard axis reads
    ``objective`` = ``jsd``, ``lr``, ``seed``, ``base_seed``, ``dpo.lr``, ``dpo.objective``.
    """
    plain = OmegaConf.to_container(cfg, resolve=True)
    objective = plain.pop("objective", {}) or {}
    dpo = dict(plain.pop("dpo", {}) or {})
    dpo_objective = dpo.pop("objective", {}) or {}
    axes = {
        "objective": objective.get("name"),
        "lr": float(cfg.lr),
        "seed": int(cfg.seed),
        "base_seed": base_seed(cfg),
        "dpo": {"objective": dpo_objective.get("name"), "beta": dpo_objective.get("beta"), **dpo,
                "objective_settings": dpo_objective},
        "objective_settings": objective,
    }
    return {**axes, **{k: v for k, v in plain.items() if k not in axes}}
