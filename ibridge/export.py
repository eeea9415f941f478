"""A trained checkpoint as a Hugging Face hub folder with a model card (``ibridge export``; docs/design.md §3).

    ibridge export checkpoint=outputs/pipeline/default/dpo/checkpoint hub_id=me/toy-dpo

The folder holds the checkpoint's files (weights, config, tokenizer with its chat template),
the stage's LoRA adapters under ``adapter/`` when it had some, and ``README.md``: a model card
whose front matter ``huggingface_hub`` reads (library, base model, datasets, tags) and whose
text says what made the model, read from the run that trained it: the base model, the data,
each stage's objective and learning rate, the run's evaluation table, and the command.

With a Hugging Face token (``HF_TOKEN`` or ``hf auth login``) and a ``hub_id`` the folder is
pushed (``export.push=auto``; ``false`` never pushes); otherwise it is written and the
command that uploads it is printed.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ibridge.adapters import ADAPTER_DIR
from ibridge.io import publish_dir, staging_dir
from ibridge.naming import fmt_lr

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
STAGE_RECORD = "stage.json"  # written by ibridge.stages.train_stage beside checkpoint/
EVAL_ORDER = ("base", "checkpoint", "sft", "dpo")


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked; the message is one line."""


@dataclass
class Provenance:
    """What made a checkpoint, read from its run folder (whatever of it exists)."""

    checkpoint: Path
    stages: list[tuple[str, dict]] = field(default_factory=list)  # (stage, stage.json), first stage first
    base: str | None = None
    config: dict = field(default_factory=dict)  # the run's config.yaml
    results: dict = field(default_factory=dict)  # the run's results.json
    hydra_overrides: list[str] = field(default_factory=list)  # e.g. hydra.run.dir=..., from .hydra/hydra.yaml


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def provenance(checkpoint: Path) -> Provenance:
    """Follow ``stage.json`` records from `checkpoint` back to the base model (a DPO stage's
    ``init`` is the SFT checkpoint, whose ``init`` is the base)."""
    checkpoint = Path(checkpoint)
    found = Provenance(checkpoint=checkpoint)
    current, seen = checkpoint, set()
    while current is not None and str(current) not in seen:
        seen.add(str(current))
        record = _read_json(Path(current).parent / STAGE_RECORD)
        if not record:
            found.base = str(current)
            break
        found.stages.insert(0, (Path(current).parent.name, record))
        current = Path(record["init"]) if record.get("init") else None
    run_dir = checkpoint.parent.parent if found.stages else checkpoint.parent
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        found.config = yaml.safe_load(config_path.read_text()) or {}
    found.results = _read_json(run_dir / "results.json")
    found.hydra_overrides = _hydra_overrides(run_dir / ".hydra" / "hydra.yaml")
    return found


def _hydra_overrides(path: Path) -> list[str]:
    """The run's own Hydra overrides (``hydra.run.dir=...``), not the mode nor a sweep's folder."""
    try:
        hydra = (yaml.safe_load(path.read_text()) or {}).get("hydra") or {} if path.is_file() else {}
    except (OSError, yaml.YAMLError):
        return []
    given = ((hydra.get("overrides") or {}).get("hydra")) or []
    return [str(o) for o in given if not str(o).startswith(("hydra.mode=", "hydra.sweep."))]


def _base_name(prov: Provenance) -> tuple[str, str | None]:
    """(how the card names the base model, its hub id for the front matter or None)."""
    model = prov.config.get("model") or {}
    if model.get("kind") == "toy":
        seed = (model.get("pretrain") or {}).get("seed")
        return (f"ibridge's built-in toy base model (a {_params(prov.base)} Llama pretrained on the toy world's "
                f"corpus{'' if seed is None else f', pretrain seed {seed}'}; ibridge's docs/design.md §2)"), None
    name = str(model.get("name_or_path") or prov.base or "unknown")
    hub = name if HUB_ID.match(name) and not Path(name).expanduser().exists() else None
    return f"`{name}`", hub


def _params(folder: str | None) -> str:
    record = _read_json(Path(folder) / "ibridge_base.json") if folder else {}
    count = record.get("parameters")
    return f"{count:,}-parameter" if isinstance(count, int) else "small"


def _data_lines(prov: Provenance) -> tuple[list[str], list[str]]:
    """Lines describing the data, and the hub dataset ids among it (front matter)."""
    data = prov.config.get("data") or {}
    lines, hub = [], []

    def describe(block: dict, label: str) -> None:
        kind = block.get("kind")
        if kind == "toy":
            lines.append(f"- {label}: ibridge's toy world (data=toy, world seed {(block.get('world') or {}).get('seed')})")
            return
        where = block.get("path") or block.get("dataset")
        if block.get("dataset") and not block.get("path"):
            hub.append(str(block["dataset"]))
        split = f", split {block['split']}" if block.get("split") else ""
        lines.append(f"- {label}: data={kind}, {block.get('examples') or 'default kind'} from `{where}`{split}")

    describe(data, "data")
    for key in ("demonstrations_from", "preferences_from", "eval_from"):
        if data.get(key):
            describe(data[key], key.replace("_from", ""))
    for stage, record in prov.stages:
        for kind, report in (record.get("data") or {}).items():
            if isinstance(report, dict) and report.get("examples") is not None:
                lines.append(f"- {stage} read {report['examples']} {kind} from `{report.get('source', '?')}`")
    return lines, hub


def _fmt(value, spec: str = ".3f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def eval_table(results: dict) -> list[str]:
    """The run's evaluation as a Markdown table (one row per evaluated model)."""
    evals = dict(results.get("eval_by_stage") or {})
    if not evals and results.get("eval"):
        evals["checkpoint"] = results["eval"]
    if not evals:
        return ["No evaluation in the run that made this checkpoint."]
    rows = ["| model | gold reward | win rate [95% CI] | 1-model LC win rate | KL to reference | avg. length |",
            "|---|---|---|---|---|---|"]
    for name in [n for n in EVAL_ORDER if n in evals] + [n for n in evals if n not in EVAL_ORDER]:
        ev = evals[name] or {}
        ci = ev.get("win_rate_ci")
        interval = f" [{_fmt(ci[0], '.2f')}, {_fmt(ci[1], '.2f')}]" if isinstance(ci, list) and len(ci) == 2 else ""
        rows.append(f"| {name} | {_fmt(ev.get('gold_reward', ev.get('reward')))} | {_fmt(ev.get('win_rate'))}{interval} "
                    f"| {_fmt(ev.get('lc_win_rate'))} | {_fmt(ev.get('kl_to_ref'))} | {_fmt(ev.get('avg_length'), '.1f')} |")
    return rows


def command_of(results: dict, hydra_overrides: list[str] | tuple = ()) -> str | None:
    """The command that made the run: ``ibridge <job> <overrides> <Hydra's overrides>`` (a sweep's
    cell: the single run of that cell)."""
    if "overrides" not in results:
        return None
    job = results.get("job", "pipeline")
    words = ["ibridge"] + ([] if job == "pipeline" else [job])
    words += [shlex.quote(o) for o in [*results["overrides"], *hydra_overrides]]
    return " ".join(words)


def _objective_settings(prov: Provenance, stage: str) -> str:
    block = (prov.config.get("dpo") or {}).get("objective") if stage == "dpo" and prov.config.get("job") == "pipeline" \
        else prov.config.get("objective")
    extras = {k: v for k, v in (block or {}).items() if k != "name"}
    return ", ".join(f"{k}={v}" for k, v in extras.items())


def model_card(prov: Provenance, hub_id: str | None) -> str:
    """README.md: YAML front matter (huggingface_hub's ModelCardData) and the text."""
    from huggingface_hub import ModelCardData

    base_text, base_hub = _base_name(prov)
    data_lines, datasets = _data_lines(prov)
    objectives = [record.get("objective") for _, record in prov.stages if record.get("objective")]
    card_data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", base_model=base_hub,
                              datasets=datasets or None, tags=["ibridge", *dict.fromkeys(objectives)])
    title = hub_id or prov.checkpoint.parent.name
    lines = [f"# {title}", "",
             "Trained with [ibridge](https://arxiv.org/abs/2507.00018) (SFT and DPO through the implicit reward).", "",
             "## Base model", "", f"- {base_text}", "", "## Training", ""]
    if prov.stages:
        lines += ["| stage | objective | settings | lr | steps | examples | LoRA |", "|---|---|---|---|---|---|---|"]
        for stage, record in prov.stages:
            lines.append(f"| {stage} | {record.get('objective', '?')} | {_objective_settings(prov, stage) or '—'} | "
                         f"{fmt_lr(record.get('lr', '?'))} | {record.get('steps', '?')} | {record.get('examples', '?')} | "
                         f"{'yes (merged; adapters in adapter/)' if record.get('lora') else 'no'} |")
    else:
        lines.append("No ibridge stage record beside this checkpoint: its training is not known.")
    lines += ["", "## Data", "", *(data_lines or ["- not recorded"]), "", "## Evaluation", ""]
    lines += eval_table(prov.results)
    if prov.results.get("debug"):
        lines += ["", f"Made with `debug={prov.results['debug']}`: a smoke test on a tiny world and model, whose "
                      f"numbers say nothing about the method."]
    judge = (prov.config.get("judge") or {}).get("name")
    if judge:
        lines += ["", f"Judge: {judge}. Win rates are against fixed reference outputs; KL is sampled against each "
                      f"stage's reference model (the model it started from)."]
    command = command_of(prov.results, prov.hydra_overrides)
    lines += ["", "## Reproduce", "", "```", command or "(the command was not recorded)", "```", ""]
    return f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)


def write_folder(prov: Provenance, hub_id: str | None, final_dir: Path) -> Path:
    """The hub folder: the checkpoint's files, ``adapter/`` when the stage has one, README.md."""
    tmp = staging_dir(final_dir)
    for entry in prov.checkpoint.iterdir():
        if entry.is_file() and not entry.name.startswith("."):
            shutil.copy2(entry, tmp / entry.name)
    adapter = prov.checkpoint.parent / ADAPTER_DIR
    if adapter.is_dir():
        shutil.copytree(adapter, tmp / ADAPTER_DIR)
    (tmp / "README.md").write_text(model_card(prov, hub_id), encoding="utf-8")
    publish_dir(tmp, final_dir)
    return Path(final_dir)


def upload_command(hub_id: str | None, folder: Path, private: bool) -> str:
    """The shell command that uploads `folder` (``hf``, or ``huggingface-cli`` before hub 1.0)."""
    tool = "hf" if shutil.which("hf") or not shutil.which("huggingface-cli") else "huggingface-cli"
    return (f"{tool} upload {hub_id or '<user>/<name>'} {shlex.quote(str(folder))} ."
            + (" --private" if private else ""))


def push(folder: Path, hub_id: str, token: str, private: bool, message: str, api=None) -> str:
    """Create the repository if needed and upload the folder; returns the repository's URL."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    repo = api.create_repo(hub_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(folder), repo_id=hub_id, repo_type="model", commit_message=message)
    return str(getattr(repo, "url", None) or f"https://huggingface.co/{hub_id}")
