"""Which keys set a training stage, in every job: one meaning per key (docs/design.md §3).

- ``lr`` and ``sft.*``: the stage trained on demonstrations (the SFT family): the pipeline's
  first stage, and ``train`` with a demonstration objective;
- ``dpo.lr`` and ``dpo.*``: the stage trained on preference pairs: the pipeline's DPO stage,
  and ``train`` with a preference objective, so ``ibridge train objective=dpo`` trains at the
  pipeline's DPO learning rate unless ``dpo.lr`` says otherwise;
- ``objective``: the objective of the stage ``objective`` is given to: the pipeline's SFT stage,
  the stage ``train`` trains (``objective=dpo`` makes it a DPO stage); ``dpo.objective`` is the
  pipeline's DPO objective.

A key the job would not read is refused when given on the command line (:func:`refuse_ignored`),
rather than silently left out: ``train objective=dpo lr=1e-5`` names ``dpo.lr`` instead.
Each stage's wandb run holds that stage's own settings (:func:`stage_run_config`).
"""

from __future__ import annotations

from omegaconf import OmegaConf

from ibridge.config import ConfigError


def trained_stage(cfg) -> str:
    """``sft`` or ``dpo``: the kind of stage `train` runs for ``cfg.objective``."""
    from ibridge.objectives import data_kind_of

    return "sft" if data_kind_of(cfg.objective.name) == "demonstrations" else "dpo"


def stage_lr(cfg, stage: str) -> float:
    """The learning rate of `stage`: ``lr`` for the SFT family, ``dpo.lr`` for preference stages."""
    return float(cfg.lr if stage == "sft" else cfg.dpo.lr)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(f"{prefix}.")


def ignored_reason(cfg, key: str) -> str | None:
    """Why the job of `cfg` would ignore an override of `key`, or None when it reads it."""
    job = OmegaConf.select(cfg, "job", default="pipeline")
    if job == "pipeline" and key in ("checkpoint", "reference"):
        return (f"{key}= is for train, eval and qlogit; the pipeline starts from the base model (model.*) "
                f"and each stage's reference is the model it starts from")
    if job != "train":
        return None
    objective = cfg.objective.name
    pipeline_dpo = _under(key, "dpo.objective") or key == "objective@dpo.objective"
    if trained_stage(cfg) == "sft":
        if _under(key, "dpo") or key == "objective@dpo.objective":
            return (f"dpo.* sets the preference (DPO) stage, and train objective={objective} trains a "
                    f"demonstration stage, set by lr and sft.*")
        return None
    if key == "lr":
        return (f"lr is the learning rate of demonstration (SFT) stages; train objective={objective} trains a "
                f"preference stage at dpo.lr (now {cfg.dpo.lr:g}): pass dpo.lr=... instead")
    if _under(key, "sft"):
        return f"sft.* sets demonstration (SFT) stages; train objective={objective} trains a preference stage, set by dpo.*"
    if pipeline_dpo:
        return (f"dpo.objective is the pipeline's DPO objective; train trains objective={objective}, set by "
                f"objective.* (objective.beta=...)")
    return None


def refuse_ignored(cfg, overrides: list[str]) -> None:
    """ConfigError for the first command-line override that `cfg`'s job would not read."""
    for override in overrides:
        if "=" not in override:
            continue
        reason = ignored_reason(cfg, _key(override))
        if reason:
            raise ConfigError(f"{override}: not read by {cfg.job}: {reason}")


def _plain(tree) -> dict:
    return OmegaConf.to_container(tree, resolve=True) if OmegaConf.is_config(tree) else dict(tree or {})


def stage_run_config(config, stage: str, objective, lr: float, init, reference) -> dict:
    """The wandb config of one training stage's run: the resolved `config` with the stage's own
    settings where a dashboard looks for them: ``objective`` (the stage's objective and its
    parameters), ``lr``, the stage's optimisation block (``sft`` or ``dpo``, without the other
    stage's), ``stage``, and the ``init`` and ``reference`` models it started from."""
    config = _plain(config)
    plain = {key: value for key, value in config.items() if key not in ("sft", "dpo")}
    block = {key: value for key, value in (config.get(stage) or {}).items() if key != "objective"}
    return {**plain, "stage": stage, "objective": _plain(objective), "lr": float(lr), stage: block,
            "init": str(init), "reference": str(reference)}
