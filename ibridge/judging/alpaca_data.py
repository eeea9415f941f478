"""``eval_set=alpaca_eval``: AlpacaEval 2's 805 instructions and reference outputs as the evaluation prompts.

Read in AlpacaEval's own format, a JSON array of ``{"instruction", "output", "generator",
"dataset"}`` (``alpaca_eval_gpt4_baseline.json``: the gpt4_1106_preview outputs AlpacaEval 2
compares against), from ``eval_set.path`` or else from the hub dataset
(``eval_set.dataset``, file ``eval_set.file``) through ``huggingface_hub`` and its cache.
Each example keeps its position in the file as ``alpaca_index``, which AlpacaEval's
length-controlled GLM needs (its instruction-difficulty term is per instruction), and the
reference's ``generator``. The data's own evaluation prompts are replaced; its training
data is unchanged (docs/design.md §3).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ibridge.data.readers import file_rows
from ibridge.data.schema import DataError
from ibridge.data.sources import CompositeSource, _plain, collect

log = logging.getLogger(__name__)


class AlpacaEvalSource:
    """Only ``eval`` examples: ``{"prompt", "reference", "alpaca_index", "reference_generator"}``."""

    kinds = ("eval",)

    def __init__(self, eval_set_cfg, key: str = "eval_set"):
        cfg = _plain(eval_set_cfg)
        self.key = key
        self.path = Path(str(cfg["path"])).expanduser() if cfg.get("path") else None
        self.dataset = str(cfg.get("dataset") or "tatsu-lab/alpaca_eval")
        self.file = str(cfg.get("file") or "alpaca_eval_gpt4_baseline.json")
        self.max_examples = int(cfg.get("max_examples") or -1)
        self.reports: dict[str, dict] = {}
        self._examples: list[dict] | None = None
        if self.path is not None and not self.path.is_file():
            raise DataError(f"{key}.path={self.path}: no such file (expected AlpacaEval's "
                            f"alpaca_eval_gpt4_baseline.json, a JSON array of instruction/output rows)")

    def _location(self) -> Path:
        if self.path is not None:
            return self.path
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(repo_id=self.dataset, filename=self.file, repo_type="dataset"))
        except Exception as err:
            raise DataError(f"{self.dataset}/{self.file}: could not load from the Hugging Face hub "
                            f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); set {self.key}.path to a "
                            f"local copy (docs/real_setting.md)") from None

    def examples(self, kind: str) -> list[dict]:
        if kind != "eval":
            raise DataError(f"{self.key}=alpaca_eval holds evaluation prompts, not {kind}")
        if self._examples is None:
            location = self._location()
            rows = list(file_rows(location))
            report = self.reports.setdefault("eval", {"source": str(location)})
            examples = collect(iter(rows), "eval", str(location), self.max_examples, "error", report)
            for index, (example, (row, _origin)) in enumerate(zip(examples, rows, strict=False)):
                example["alpaca_index"] = index
                example["reference_generator"] = row.get("generator") if isinstance(row, dict) else None
            log.info("eval_set=alpaca_eval: %d prompts from %s", len(examples), location)
            self._examples = examples
        return list(self._examples)


def with_eval_set(source, eval_set_cfg):
    """`source` with its evaluation prompts taken from the eval set, when one is chosen."""
    if not eval_set_cfg or str(_plain(eval_set_cfg).get("name") or "none") == "none":
        return source
    name = str(_plain(eval_set_cfg)["name"])
    if name != "alpaca_eval":
        raise DataError(f"eval_set={name}: expected none or alpaca_eval")
    others = dict(getattr(source, "others", {})) if isinstance(source, CompositeSource) else {}
    primary = source.primary if isinstance(source, CompositeSource) else source
    return CompositeSource(primary, {**others, "eval_from": AlpacaEvalSource(eval_set_cfg)})
