"""Memory readings, configs and the spec every worker gets."""

from __future__ import annotations

import os
import resource
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def rss_mb() -> float:
    """Current resident memory of this process (MiB)."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def hwm_mb() -> float:
    """Peak resident memory since the last `reset_hwm` (VmHWM), MiB."""
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM")) / 1024


def reset_hwm() -> None:
    """Restart the peak-RSS count from the current RSS (Linux: clear_refs 5), so that one phase's
    peak can be read apart from an earlier, higher one. ru_maxrss keeps the process's peak."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def compose_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from ibridge.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides) + ["logger=none"])


def cpu_name() -> str:
    return next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), "unknown CPU")


def user(text):
    return [{"role": "user", "content": text}] if isinstance(text, str) else list(text)


def assistant(text):
    return [{"role": "assistant", "content": text}]


class Spec(dict):
    """What a worker runs, as JSON: base (model folder), data (JSON of demonstrations and
    preferences), overrides (Hydra), max_length, seed, threads, warmup_ratio, schedule, sft
    and dpo (lr, steps, batch_size, weight_decay, max_grad_norm, log_every; dpo: beta), trl
    (attn_implementation, sft_padding_free), check_batches."""

    __getattr__ = dict.__getitem__


def require_trl(script: str):
    """TRL, the benchmark-only dependency (the ibridge package never imports it), or a one-line exit."""
    try:
        import trl
    except ImportError:
        raise SystemExit(f"{script} needs TRL: pip install -e '.[bench]'") from None
    return trl
