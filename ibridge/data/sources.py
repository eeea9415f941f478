"""Where examples come from: the toy world, local files, or hub datasets (docs/design.md §3).

A source has ``kinds`` (what it can supply) and ``examples(kind) -> list[dict]``
for ``demonstrations``, ``heldout_demonstrations``, ``preferences``,
``heldout_pairs`` and ``eval``. Rows are checked as they are read
(`ibridge.data.schema`); a bad row stops the run with its file and row named,
or with ``data.bad_rows=skip`` is counted and reported. Examples read from files
carry ``origin`` (``file, line N``) so that later errors can name them too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path

from omegaconf import OmegaConf

from ibridge.data.formats import normalise
from ibridge.data.readers import check_location, hub_rows, location_rows
from ibridge.data.schema import PARSERS, DataError

log = logging.getLogger(__name__)

# Demonstrations held back from training, to measure drift (kl/token) on data the
# stage did not fit.
HELDOUT_DEMONSTRATIONS = 64


def _plain(cfg) -> dict:
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


class ToySource:
    """The synthetic world of docs/design.md §2, built deterministically from its config."""

    kinds = ("demonstrations", "preferences", "heldout_pairs", "eval")

    def __init__(self, data_cfg: Mapping, key: str = "data"):
        from ibridge.world import WorldConfig

        self.world_config = WorldConfig.from_mapping(_plain(data_cfg)["world"])

    @cached_property
    def world(self):
        from ibridge.world import build_world

        return build_world(self.world_config)

    def examples(self, kind: str) -> list[dict]:
        demos = self.world.demonstrations
        keep = max(len(demos) - HELDOUT_DEMONSTRATIONS, len(demos) // 2)
        if kind == "demonstrations":
            return demos[:keep]
        if kind == "heldout_demonstrations":
            return demos[keep:]
        if kind == "preferences":
            return self.world.preferences
        if kind == "heldout_pairs":
            return self.world.heldout_pairs
        if kind == "eval":
            return self.world.eval
        raise KeyError(f"toy data has no split {kind!r}; expected one of {', '.join(self.kinds)}")

    def eval_slices(self, prompts: list[str]) -> dict[str, list[bool]]:
        """Subsets of the eval prompts scored as metrics of their own (ibridge.world.eval_slices)."""
        from ibridge.world import eval_slices

        return eval_slices(self.world_config, prompts)


HELDOUT = {"demonstrations": "heldout_demonstrations", "preferences": "heldout_pairs"}
BAD_ROWS = ("error", "skip")


def collect(rows: Iterable, kind: str, label: str, limit: int = -1, bad_rows: str = "error",
            report: dict | None = None) -> list[dict]:
    """Parse rows into examples of `kind`; at most `limit` (> 0) of them.

    A bad row raises DataError naming it, or with ``bad_rows="skip"`` is counted in
    `report` and logged. No rows at all is an error naming `label`.
    """
    parse = PARSERS[kind]
    examples, skipped, seen = [], [], 0
    for row, origin in rows:
        seen += 1
        try:
            example = parse(normalise(row, kind, origin), origin)  # TRL, ShareGPT, Alpaca rows too
        except DataError as err:
            if bad_rows != "skip":
                raise
            skipped.append(str(err))
            continue
        example["origin"] = origin
        examples.append(example)
        if 0 < limit <= len(examples):
            break
    if report is not None:
        report.update(rows=seen, examples=len(examples), skipped_rows=len(skipped), first_skipped=skipped[:3])
    if skipped:
        log.warning("%s: skipped %d of %d rows that are not valid %s (data.bad_rows=skip); first: %s",
                    label, len(skipped), seen, kind, skipped[0])
    if not examples:
        if seen == 0:
            raise DataError(f"{label}: no rows; expected {kind}")
        raise DataError(f"{label}: none of its {seen} rows is valid {kind} (data.bad_rows=skip); first: {skipped[0]}")
    return examples


def _location(cfg: dict, field: str, key: str) -> Path | None:
    value = cfg.get(field)
    if value in (None, "", "???"):
        return None
    path = Path(str(value)).expanduser()
    check_location(path, f"{key}.{field}")
    return path


class DatasetSource:
    """Examples of one kind from local files, or from a hub dataset unless ``data.path`` is set.

    Config keys: ``examples`` (the kind: demonstrations | preferences | eval),
    ``path`` / ``heldout_path`` (file or folder, see `ibridge.data.readers`),
    ``dataset`` / ``split`` / ``heldout_split`` (the hub dataset and its splits;
    a folder at ``path`` is searched for files named after the splits),
    ``max_examples`` / ``heldout_max_examples`` (> 0: the first N valid rows),
    ``bad_rows`` (error | skip).
    """

    default_examples = "demonstrations"

    def __init__(self, data_cfg: Mapping, key: str = "data"):
        cfg = _plain(data_cfg)
        self.key = key
        self.name = str(cfg.get("kind", "local"))
        self.example_kind = cfg.get("examples") or self.default_examples
        if self.example_kind not in PARSERS:
            raise DataError(f"{key}.examples={self.example_kind!r}: expected one of {', '.join(PARSERS)}")
        self.dataset = cfg.get("dataset")
        self.split = cfg.get("split")
        self.heldout_split = cfg.get("heldout_split")
        self.path = _location(cfg, "path", key)
        self.heldout_path = _location(cfg, "heldout_path", key)
        self.max_examples = int(cfg.get("max_examples") or -1)
        self.heldout_max_examples = int(cfg.get("heldout_max_examples") or -1)
        self.bad_rows = cfg.get("bad_rows") or "error"
        if self.bad_rows not in BAD_ROWS:
            raise DataError(f"{key}.bad_rows={self.bad_rows!r}: expected one of {', '.join(BAD_ROWS)}")
        self.kinds = (self.example_kind, HELDOUT[self.example_kind]) if self.example_kind in HELDOUT else (
            self.example_kind,)
        self.reports: dict[str, dict] = {}
        self._cache: dict[str, list[dict]] = {}

    def _rows(self, heldout: bool):
        """(rows or None, label) of the training or held-out split."""
        split = self.heldout_split if heldout else self.split
        if heldout and self.heldout_path is not None:
            return location_rows(self.heldout_path, split, required=True)
        if self.path is not None:
            if heldout and (self.path.is_file() or not split):
                return None, str(self.path)
            return location_rows(self.path, split, required=not heldout)
        if self.dataset and split:
            return hub_rows(self.dataset, split), f"{self.dataset}[{split}]"
        if heldout:
            return None, ""
        raise DataError(f"{self.key}.path is not set (data={self.name}); expected a .jsonl, .json or .parquet file or a folder")

    def _read(self, heldout: bool) -> list[dict]:
        key = "heldout" if heldout else "train"
        if key not in self._cache:
            rows, label = self._rows(heldout)
            if rows is None:
                self._cache[key] = []
            else:
                report = self.reports.setdefault(HELDOUT.get(self.example_kind, "heldout") if heldout
                                                 else self.example_kind, {"source": label})
                limit = self.heldout_max_examples if heldout else self.max_examples
                self._cache[key] = collect(rows, self.example_kind, label, limit, self.bad_rows, report)
                log.info("data=%s: %d %s%s from %s", self.name, len(self._cache[key]),
                         "held-out " if heldout else "", self.example_kind, label)
        return self._cache[key]

    def examples(self, kind: str) -> list[dict]:
        if kind == self.example_kind:
            return list(self._read(heldout=False))
        if kind == HELDOUT.get(self.example_kind):
            return list(self._read(heldout=True))
        raise DataError(f"data={self.name} holds {self.example_kind}, not {kind}")


class LocalSource(DatasetSource):
    """``data=jsonl``: local JSONL / JSON / Parquet files holding one kind of example (``data.examples``)."""


JsonlSource = LocalSource  # the earlier name


class UltraChatSource(DatasetSource):
    """UltraChat-200k (``HuggingFaceH4/ultrachat_200k``): multi-turn ``messages`` for SFT.

    Every assistant turn is trained on (`ibridge.data.formatting.encode_conversation`).
    """

    default_examples = "demonstrations"

    def __init__(self, data_cfg: Mapping, key: str = "data"):
        cfg = {"dataset": "HuggingFaceH4/ultrachat_200k", "split": "train_sft", "heldout_split": "test_sft",
               **{k: v for k, v in _plain(data_cfg).items() if v is not None}}
        super().__init__(cfg, key)


class UltraFeedbackSource(DatasetSource):
    """UltraFeedback binarized (``HuggingFaceH4/ultrafeedback_binarized``): ``chosen``/``rejected`` conversations.

    The prompt is the messages both share; chosen and rejected are their last
    (assistant) messages. Evaluation prompts (``eval``) are the held-out pairs'
    prompts with the chosen response as the fixed reference output.
    """

    default_examples = "preferences"

    def __init__(self, data_cfg: Mapping, key: str = "data"):
        cfg = {"dataset": "HuggingFaceH4/ultrafeedback_binarized", "split": "train_prefs",
               "heldout_split": "test_prefs", **{k: v for k, v in _plain(data_cfg).items() if v is not None}}
        super().__init__(cfg, key)
        self.kinds = (*self.kinds, "eval")

    def examples(self, kind: str) -> list[dict]:
        if kind != "eval":
            return super().examples(kind)
        pairs = self._read(heldout=True)
        if not pairs:
            raise DataError(f"data={self.name}: no held-out pairs to take evaluation prompts from; set "
                            f"{self.key}.heldout_path, or data.eval_from to a file of prompts with reference outputs")
        return [{"prompt": p["prompt"], "reference": p["chosen"], "origin": p["origin"]} for p in pairs]


# A kind's family: which `<family>_from` sub-config supplies it.
FAMILY = {"demonstrations": "demonstrations", "heldout_demonstrations": "demonstrations",
          "preferences": "preferences", "heldout_pairs": "preferences", "eval": "eval"}
FROM_KEYS = tuple(f"{family}_from" for family in ("demonstrations", "preferences", "eval"))


class CompositeSource:
    """A source plus others for the kinds it lacks: ``data.demonstrations_from``,
    ``data.preferences_from``, ``data.eval_from`` (each a data config of its own).

    As in the paper, ``data=ultrachat`` takes its preference pairs from UltraFeedback
    and ``data=ultrafeedback`` its demonstrations from UltraChat. A kind comes from
    its ``<family>_from`` source when set, else from the main source, else from the
    first other source that has it.
    """

    def __init__(self, primary, others: dict):
        self.primary = primary
        self.others = others
        kinds = list(primary.kinds)
        for source in others.values():
            kinds += [k for k in source.kinds if k not in kinds]
        self.kinds = tuple(kinds)

    def source_of(self, kind: str):
        chosen = self.others.get(f"{FAMILY.get(kind, kind)}_from")
        if chosen is not None:
            return chosen
        for source in (self.primary, *self.others.values()):
            if kind in source.kinds:
                return source
        return self.primary

    def examples(self, kind: str) -> list[dict]:
        return self.source_of(kind).examples(kind)

    @property
    def reports(self) -> dict:
        out = dict(getattr(self.primary, "reports", {}))
        for source in self.others.values():
            out.update(getattr(source, "reports", {}))
        return out
