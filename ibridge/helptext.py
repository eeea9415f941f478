"""``ibridge --help``: every option with its value and the comment beside it in the YAML (docs/design.md §3).

The config is composed with the command's overrides (``ibridge train objective=jsd --help``
shows jsd's settings), and each key is printed with its current value and the comment the
YAML file that sets it gives it: the comment on its line, or the comment lines right above it.
A config file's opening comment describes the option it is (``model=toy``), and is shown with
the config groups. Lines fit the terminal (:mod:`ibridge.terminal`). Hydra's own help stays at
``--hydra-help``.
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

from ibridge.terminal import wrap

KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w@.-]*):(?P<rest>.*)$")
HELP_FLAGS = ("--help", "-h")

USAGE = """\
ibridge: SFT and DPO through the implicit reward (arXiv 2507.00018).

Usage: ibridge [JOB] [key=value ...] [group=option ...] [-m [--dry-run]]
  JOB  pipeline (default: base -> SFT -> DPO -> eval), train (one stage),
       eval (a checkpoint), qlogit (logits as Q-function), report (a sweep's
       tables and plots), dashboard (a wandb Workspace and Report), export (a
       checkpoint with a model card, for the Hugging Face hub)
  -m   a sweep over comma-separated values: ibridge -m lr=1e-3,1e-4 seed=0,1;
       --dry-run lists its cells and their estimated time, and stops;
       sweep.resume=<sweep folder>|last runs a sweep again in its folder,
       skipping the cells that completed there
  e.g. ibridge train objective=sft lr=1e-3
       ibridge debug=smoke
  Shell completion (bash, zsh): eval "$(ibridge -sc install=bash)"
  Hydra's own help: ibridge --hydra-help. Docs: README.md, docs/design.md.
"""


def _split_comment(rest: str) -> tuple[str, str]:
    """A YAML line's value and its trailing comment (a `#` after a space, outside quotes)."""
    quote = None
    for i, char in enumerate(rest):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or rest[i - 1] == " "):
            return rest[:i].strip(), rest[i + 1:].strip()
    return rest.strip(), ""


def yaml_comments(path: Path) -> tuple[dict[str, str], str]:
    """``({dotted key: comment}, the file's opening comment)`` of one YAML config file."""
    comments: dict[str, str] = {}
    opening: list[str] = []
    above: list[str] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    seen_key = False
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if not text.startswith("@package"):
                (above if seen_key else opening).append(text)
            continue
        if not stripped:
            above = []
            continue
        match = KEY_LINE.match(line)
        if not match:
            above = []
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([k for _, k in stack] + [match["key"]])
        _, trailing = _split_comment(match["rest"])
        text = " ".join(above + [trailing]).strip()
        if text:
            comments[key] = text
        stack.append((indent, match["key"]))
        above, seen_key = [], True
    return comments, " ".join(opening)


def _groups(conf_dir: Path) -> list[str]:
    return sorted(p.name for p in conf_dir.iterdir() if p.is_dir() and p.name != "hydra")


def _sources(conf_dir: Path, choices: dict) -> list[tuple[str, dict[str, str]]]:
    """``(package, comments)`` of every file the config was composed from, the main file last
    (so that a group's own comment wins for its keys)."""
    sources = []
    for name, choice in choices.items():
        if name.startswith("hydra/") or not choice:
            continue
        group, _, package = name.partition("@")
        path = conf_dir / group / f"{choice}.yaml"
        if path.is_file():
            header = path.read_text(encoding="utf-8").split("\n", 1)[0]
            glob = "@package _global_" in header
            sources.append(("" if glob else (package or group), yaml_comments(path)[0]))
    sources.append(("", yaml_comments(conf_dir / "config.yaml")[0]))
    return sources


def _comment(key: str, sources) -> str:
    for package, comments in sources:
        if package and not key.startswith(f"{package}."):
            continue
        relative = key[len(package) + 1:] if package else key
        if relative in comments:
            return comments[relative]
    return ""


def _leaves(node, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():  # an empty mapping (`debug: none`'s) sets nothing: not shown
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def _value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _entry(label: str, comment: str, width: int) -> list[str]:
    """``  label   comment`` on one line when it fits, else the comment wrapped beneath."""
    one = f"  {label}   {comment}" if comment else f"  {label}"
    if len(one) <= width:
        return [one]
    lines = wrap(label, width, indent="  ", subsequent="  ")
    return lines + (wrap(comment, width, indent="      ", subsequent="") if comment else [])


def help_text(conf_dir: Path, overrides: list[str], width: int) -> str:
    """The whole ``--help`` text for a command's overrides."""
    from ibridge.composing import compose

    cfg = compose(conf_dir, overrides, return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    lines = USAGE.splitlines() + ["", "Config groups (group=option; [the current one]):"]
    for group in _groups(conf_dir):
        current = choices.get(group)
        options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        shown = " ".join(f"[{o}]" if o == current else o for o in options)
        lines += wrap(f"{group:<10} {shown}", width, indent="  ", subsequent=" " * 11)
        if current and (conf_dir / group / f"{current}.yaml").is_file():
            description = yaml_comments(conf_dir / group / f"{current}.yaml")[1]
            if description:
                lines += wrap(f"{current}: {description}", width, indent=" " * 13, subsequent="  ")
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    # The main file's keys first, in its order (job, seed, lr, ...), then the groups' (model, data, ...).
    main_keys = [k for k in OmegaConf.load(conf_dir / "config.yaml") if k not in ("defaults", "hydra")]
    plain = {k: plain[k] for k in [*[k for k in main_keys if k in plain], *[k for k in plain if k not in main_keys]]}
    sources = _sources(conf_dir, choices)
    lines += ["", "Options (key = current value, then what it does):"]
    leaves = list(_leaves(plain))
    siblings: dict[str, int] = {}
    for key, _ in leaves:
        siblings[key.rpartition(".")[0]] = siblings.get(key.rpartition(".")[0], 0) + 1
    for key, value in leaves:
        parent = key.rpartition(".")[0]
        # A section's comment describes its only key (`report:` above `path:`).
        comment = _comment(key, sources) or (_comment(parent, sources) if parent and siblings[parent] == 1 else "")
        lines += _entry(f"{key} = {_value(value)}", comment, width)
    return "\n".join(lines)
