"""``logger.mode=online`` needs wandb credentials: checked with the config, before any model loads.

wandb itself finds out only at ``wandb.init``, after the base model and the data have
loaded, and says so in a long traceback. The credentials it would use are an API key in
``WANDB_API_KEY``, an identity-token file in ``WANDB_IDENTITY_TOKEN_FILE``, or an entry for
the server's host (``WANDB_BASE_URL``, default api.wandb.ai) in the netrc file (``NETRC``,
default ``~/.netrc``) that ``wandb login`` writes. Whether the key is valid, and the server
reachable, only the server can say.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_BASE_URL = "https://api.wandb.ai"


def _netrc_path() -> Path:
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    home = Path.home()
    return home / ".netrc" if (home / ".netrc").exists() or not (home / "_netrc").exists() else home / "_netrc"


def has_credentials() -> tuple[bool, str]:
    """(whether wandb would find credentials, where ibridge looked)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True, "WANDB_API_KEY"
    host = urlparse(os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL).hostname or "api.wandb.ai"
    path = _netrc_path()
    try:
        entry = netrc.netrc(str(path)).authenticators(host) if path.is_file() else None
    except (OSError, netrc.NetrcParseError):
        entry = None
    return bool(entry and entry[2]), f"WANDB_API_KEY is unset and {path} has no entry for {host}"


def online_problem(logger_cfg) -> str | None:
    """A one-line reason why ``logger.mode=online`` cannot work here, or None."""
    if logger_cfg is None or logger_cfg.get("backend") != "wandb" or str(logger_cfg.get("mode")) != "online":
        return None
    found, where = has_credentials()
    if found:
        return None
    return (f"logger.mode=online: no wandb credentials ({where}); run `wandb login` or set WANDB_API_KEY, "
            f"or log offline (logger.mode=offline) and upload later with `wandb sync`")
