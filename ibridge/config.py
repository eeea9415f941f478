"""Config validation: every check that can fail before a model loads (docs/design.md §3).

Hydra composes the config; this module checks what composition cannot: value
ranges, the job name, and whether the objective's data kind matches the data.
Each failure is a one-line `ConfigError` that names the key and what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf

JOBS = ("pipeline", "train", "eval", "qlogit", "report", "dashboard", "export")
STAGE_KEYS = ("sft", "dpo")


class ConfigError(ValueError):
    """A config value is invalid; the message names the key."""


def _positive(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected a number > 0")
    if not value > 0:
        raise ConfigError(f"{key}={value!r}: expected a number > 0")


def _positive_int(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key}={value!r}: expected an integer > 0")


def _objective_errors(cfg: Mapping, key: str) -> None:
    """Build the objective once so that bad names and parameters fail here."""
    from ibridge.objectives import build_objective

    try:
        build_objective(cfg)
    except ValueError as err:
        # Objective errors name `objective.<param>`; re-anchor them at `key`.
        raise ConfigError(str(err).replace("objective.", f"{key}.")) from None


def data_kinds_provided(data_cfg: Mapping) -> set[str]:
    """Which kinds of examples a data config can supply (reads no data)."""
    from ibridge.data import DataError, source_for

    try:
        return set(source_for(data_cfg).kinds)
    except DataError as err:  # a bad data.kind / data.examples / data.path: one line, before any model loads
        raise ConfigError(str(err)) from None


def _model_folder(key: str, value) -> None:
    """A local checkpoint must be a Hugging Face folder with safetensors weights."""
    from pathlib import Path

    path = Path(str(value)).expanduser()
    if not path.exists():
        if str(value).startswith((".", "/", "~")):
            raise ConfigError(f"{key}={value}: no such folder")
        return  # a hub name; loading will say if it is unknown
    if not path.is_dir() or not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise ConfigError(f"{key}={value}: not a model folder (expected config.json and *.safetensors)")


def _paths_exist(cfg: DictConfig) -> None:
    from pathlib import Path

    for key in ("checkpoint", "reference", "model.name_or_path"):
        value = OmegaConf.select(cfg, key)
        if value:
            _model_folder(key, value)
    # data.path and data.heldout_path, also of the data configs under data.*_from
    prefixes = ["data"] + [f"data.{k}" for k in ("demonstrations_from", "preferences_from", "eval_from")
                           if OmegaConf.select(cfg, f"data.{k}", default=None)]
    for key in (f"{prefix}.{name}" for prefix in prefixes for name in ("path", "heldout_path")):
        value = OmegaConf.select(cfg, key, default=None)
        if value and value != "???" and not Path(str(value)).expanduser().exists():
            raise ConfigError(f"{key}={value}: no such file or folder")


def _kind_hint(cfg: DictConfig, missing: set[str]) -> str:
    """How to supply the missing kind: a local file says its kind in ``data.examples``
    (default demonstrations), and a pipeline takes its other kind from ``data.<kind>_from``."""
    if OmegaConf.select(cfg, "data.examples", default=None) is None:
        return ""
    kind = sorted(missing)[0]
    hint = f"; if data.path holds {kind}, set data.examples={kind}"
    if cfg.job == "pipeline":
        hint += (f"; a pipeline needs both kinds: give the {kind} as "
                 f"'+data.{kind}_from={{kind: jsonl, examples: {kind}, path: <file>}}' (docs/real_setting.md)")
    return hint


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first invalid setting of `cfg`.

    The checks run in a fixed order (job and numbers, then the trainer, then services that would
    fail late, then data), so that the error a user sees first is the cheapest to fix."""
    if cfg.job not in JOBS:
        raise ConfigError(f"job={cfg.job!r}: expected one of {', '.join(JOBS)}")
    seed = OmegaConf.select(cfg, "seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:  # 1.5 would be truncated silently
        raise ConfigError(f"seed={seed!r}: expected an integer >= 0")
    _positive(cfg, "lr")
    _positive(cfg, "dpo.lr")
    _objective_errors(OmegaConf.to_container(cfg.objective, resolve=True), "objective")
    _objective_errors(OmegaConf.to_container(cfg.dpo.objective, resolve=True), "dpo.objective")
    for stage in STAGE_KEYS:
        _check_stage(cfg, stage)
    _positive_int(cfg, "eval.max_new_tokens")
    _positive_int(cfg, "eval.batch_size")
    _positive_int(cfg, "model.max_length")
    from ibridge.resource_config import validate_resources

    validate_resources(cfg)  # gradient checkpointing, save cadence, generation budget, TF32 (issue 20)
    _check_trainer(cfg)
    warmup = cfg.schedule.warmup_ratio
    if not 0 <= warmup < 1:
        raise ConfigError(f"schedule.warmup_ratio={warmup!r}: expected a number in [0, 1)")
    _check_services(cfg)
    _paths_exist(cfg)
    _check_data_kinds(cfg)


def _check_stage(cfg: DictConfig, stage: str) -> None:
    """The numbers and optimiser of one stage's settings (``sft.*`` or ``dpo.*``)."""
    for key in ("batch_size", "grad_accum", "epochs", "log_every"):
        _positive_int(cfg, f"{stage}.{key}")
    for key in ("max_steps", "save_every", "eval_every"):
        value = OmegaConf.select(cfg, f"{stage}.{key}")
        least = -1 if key == "max_steps" else 0  # max_steps=-1: the epochs decide
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(f"{stage}.{key}={value!r}: expected an integer >= {least}")
    decay = OmegaConf.select(cfg, f"{stage}.weight_decay")
    if not isinstance(decay, (int, float)) or decay < 0:
        raise ConfigError(f"{stage}.weight_decay={decay!r}: expected a number >= 0")
    if OmegaConf.select(cfg, f"{stage}.optimizer", default="adamw") not in ("adamw", "sgd"):
        raise ConfigError(f"{stage}.optimizer={OmegaConf.select(cfg, f'{stage}.optimizer')!r}: expected adamw or sgd")


def _check_trainer(cfg: DictConfig) -> None:
    """The data-parallel mode, its precision and its process-group settings."""
    from ibridge.distributed import DATA_PARALLEL_MODES

    mode = OmegaConf.select(cfg, "trainer.distributed", default="none")
    if mode not in ("none", *DATA_PARALLEL_MODES):
        raise ConfigError(f"trainer.distributed={mode!r}: expected one of none, {', '.join(DATA_PARALLEL_MODES)}")
    if mode in ("fsdp", "deepspeed") and OmegaConf.select(cfg, "model.lora.enabled", default=False):
        raise ConfigError(f"model.lora.enabled=true with trainer={mode}: LoRA stages run with trainer=ddp "
                          "(the frozen base fits each GPU; only the adapters train)")
    if mode == "deepspeed":
        stage = OmegaConf.select(cfg, "trainer.deepspeed.zero_stage", default=None)
        if stage not in (1, 2, 3) or isinstance(stage, bool):
            raise ConfigError(f"trainer.deepspeed.zero_stage={stage!r}: expected 1, 2 or 3")
    precision = OmegaConf.select(cfg, "trainer.precision", default="auto")
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"trainer.precision={precision!r}: expected auto, fp32, bf16 or fp16")
    if precision == "fp16" and mode != "deepspeed":
        # fp16 gradients underflow without loss scaling; only DeepSpeed's engine scales the loss.
        raise ConfigError(f"trainer.precision=fp16 with trainer.distributed={mode}: fp16 needs a loss scaler, "
                          "which only trainer=deepspeed has; use bf16 (or fp32 on GPUs without bf16)")
    timeout = OmegaConf.select(cfg, "trainer.dist_timeout_min", default=60)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"trainer.dist_timeout_min={timeout!r}: expected a number of minutes > 0")
    seed = OmegaConf.select(cfg, "model.pretrain.seed", default=None)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ConfigError(f"model.pretrain.seed={seed!r}: expected an integer, or null for the world's seed")
    if not isinstance(OmegaConf.select(cfg, "trainer.pack_sequences", default=True), bool):
        raise ConfigError(f"trainer.pack_sequences={cfg.trainer.pack_sequences!r}: expected true or false")


def _check_services(cfg: DictConfig) -> None:
    """wandb and the judge: each would otherwise fail only after the model loaded, in a traceback."""
    from ibridge.wandb_check import online_problem

    problem = online_problem(OmegaConf.select(cfg, "logger", default=None))
    if problem:
        raise ConfigError(problem)
    if cfg.judge.name == "reward_model" and OmegaConf.is_missing(cfg.judge, "path"):
        raise ConfigError("judge.path is not set: expected a reward model's hub name or local folder")
    if cfg.judge.name == "alpaca_eval":
        from ibridge.judging.settings import judge_settings

        judge_settings(cfg.judge)  # JudgeError is a ConfigError naming the judge.* key


def _check_data_kinds(cfg: DictConfig) -> None:
    """The objectives' kinds of examples (demonstrations, preferences, evaluation prompts) against
    what the data config supplies; the export job's own checks."""
    from ibridge.objectives import data_kind_of

    provided = data_kinds_provided(cfg.data)
    if OmegaConf.select(cfg, "eval_set.name", default="none") != "none":
        provided.add("eval")  # eval_set=alpaca_eval supplies the evaluation prompts
    needed = {data_kind_of(cfg.objective.name)}
    if cfg.job == "pipeline":
        if needed != {"demonstrations"}:
            raise ConfigError(
                f"objective={cfg.objective.name}: the pipeline's first stage is SFT and needs a "
                f"demonstration objective; preference objectives belong under dpo.objective"
            )
        needed.add(data_kind_of(cfg.dpo.objective.name))
        if data_kind_of(cfg.dpo.objective.name) != "preferences":
            raise ConfigError(
                f"dpo.objective.name={cfg.dpo.objective.name}: expected a preference objective"
            )
    if cfg.job in ("train", "pipeline"):
        missing = needed - provided
        if missing:
            raise ConfigError(
                f"objective={cfg.objective.name} needs {', '.join(sorted(missing))} but "
                f"data={cfg.data.kind} provides {', '.join(sorted(provided))}{_kind_hint(cfg, missing)}"
            )
    if cfg.job == "export":
        from ibridge.jobs.export import check

        check(cfg)
    if cfg.job == "eval" and "eval" not in provided:
        raise ConfigError(f"data={cfg.data.kind} has no evaluation prompts; eval needs data=toy")
