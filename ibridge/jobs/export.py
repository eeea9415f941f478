"""`ibridge export`: a checkpoint as a hub folder with a model card, pushed when a token is present.

See :mod:`ibridge.export`. Settings: ``checkpoint`` (a stage's ``checkpoint/`` folder),
``hub_id`` (``<user or org>/<name>``; null: write the folder only), ``export.dir`` (where the
folder goes; null: ``<run folder>/hub/<name>``), ``export.private`` (a new repository's
visibility) and ``export.push`` (auto: push when a Hugging Face token is present; false: never).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from ibridge.config import ConfigError
from ibridge.export import HUB_ID, command_of, provenance, push, upload_command, write_folder

log = logging.getLogger(__name__)


def check(cfg) -> None:
    """Config checks of the export job (called by ibridge.config.validate)."""
    if not OmegaConf.select(cfg, "checkpoint", default=None):
        raise ConfigError("export needs checkpoint=<a stage's checkpoint folder>, e.g. "
                          "checkpoint=outputs/pipeline/default/dpo/checkpoint")
    hub_id = OmegaConf.select(cfg, "hub_id", default=None)
    if hub_id is not None and not HUB_ID.match(str(hub_id)):
        raise ConfigError(f"hub_id={hub_id}: expected <user or organisation>/<name>")
    if OmegaConf.select(cfg, "export.push", default="auto") not in ("auto", False, True):
        raise ConfigError(f"export.push={OmegaConf.select(cfg, 'export.push')!r}: expected auto, true or false")


def run(ctx) -> None:
    from huggingface_hub import get_token

    cfg = ctx.cfg
    checkpoint = Path(str(cfg.checkpoint)).expanduser()
    hub_id = OmegaConf.select(cfg, "hub_id", default=None)
    settings = OmegaConf.select(cfg, "export", default=None) or {}
    private, wanted = bool(settings.get("private", True)), settings.get("push", "auto")
    prov = provenance(checkpoint)
    name = str(hub_id).split("/", 1)[1] if hub_id else f"{checkpoint.parent.parent.name}-{checkpoint.parent.name}"
    folder = Path(str(settings.get("dir") or ctx.run_dir / "hub" / name)).expanduser()
    write_folder(prov, hub_id, folder)
    record = {"folder": str(folder), "hub_id": hub_id, "checkpoint": str(checkpoint),
              "stages": [stage for stage, _ in prov.stages], "pushed": False}
    token = get_token()
    if wanted is True and not (token and hub_id):
        raise ConfigError("export.push=true needs hub_id and a Hugging Face token (HF_TOKEN or `hf auth login`)")
    if wanted is not False and token and hub_id:
        command = command_of(prov.results, prov.hydra_overrides) or "ibridge export"
        record["url"] = push(folder, str(hub_id), token, private, f"ibridge export ({command})")
        record["pushed"] = True
        log.info("export: pushed %s to %s", folder, record["url"])
    else:
        why = "export.push=false" if wanted is False else ("no hub_id" if not hub_id else "no Hugging Face token")
        record["upload_command"] = upload_command(hub_id, folder, private)
        log.info("export: %s; the folder is ready for: %s", why, record["upload_command"])
    ctx.results["export"] = record
