"""Configuration of the toy world (docs/design.md §2)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .tasks import TASKS

WORLD_FORMAT_VERSION = 1
"""Bumped whenever the generation procedure changes; part of :meth:`WorldConfig.fingerprint`."""


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines a toy world; same config -> identical world.

    Fields (see the module docstring of :mod:`ibridge.world` for what each split imitates):

    - ``seed``: the only source of randomness.
    - ``tasks``: task words, a subset of :data:`ibridge.world.tasks.TASKS`.
    - ``num_symbols``: prompts draw symbols from the digit words ``"0"`` .. ``str(num_symbols-1)``
      (2..10). Answers may contain any digit (``count``, ``add1`` wraps mod 10), so the
      tokenizer always holds all ten.
    - ``min_len`` .. ``max_len``: number of symbols in eval / preference / held-out / corpus prompts.
    - ``demo_max_len``: demonstrations only use ``min_len`` .. ``demo_max_len`` (narrower slice).
    - ``n_demonstrations``, ``n_preference_prompts``, ``n_heldout_pairs``, ``n_eval``, ``n_corpus``:
      split sizes. ``n_preference_prompts`` counts prompts: those whose candidates all tie are
      dropped, so ``len(world.preferences) <= n_preference_prompts``. ``n_heldout_pairs`` counts
      pairs: prompts are drawn until that many non-tied pairs exist.
    - ``corpus_noise``: share of corpus lines whose answer is corrupted (at least one error).
    - ``responses_per_prompt``: candidates judged per preference / held-out prompt (>= 2).
    - ``reference_noise``: per-token error rate of the fixed reference generator used for eval.
    - ``generator_noise``: per-token error rates of the pool of "generator models"; each
      candidate response comes from one of them, chosen uniformly at random (an addition to
      the brief's field list, with the brief's example rates as default).
    - ``demo_tasks``: the tasks the demonstrations cover (empty: all of ``tasks``). The others
      are *base-only* skills: in the pretraining corpus, the preference pairs and evaluation,
      never demonstrated, so what SFT erodes of them is measurable on its own
      (``eval/retained_skill``, :func:`ibridge.world.eval_slices`; the ``forgetting`` world).
    """

    seed: int = 0
    tasks: tuple[str, ...] = ("sort", "reverse", "max", "min", "add1", "count")
    num_symbols: int = 10
    min_len: int = 2
    max_len: int = 8
    demo_max_len: int = 5
    n_demonstrations: int = 3000
    n_preference_prompts: int = 3000
    n_heldout_pairs: int = 300
    n_eval: int = 200
    n_corpus: int = 20000
    corpus_noise: float = 0.25
    responses_per_prompt: int = 4
    reference_noise: float = 0.15
    generator_noise: tuple[float, ...] = (0.0, 0.1, 0.3, 0.6)
    demo_tasks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # normalise sequences to tuples so the config stays hashable
        object.__setattr__(self, "tasks", tuple(str(t) for t in self.tasks))
        object.__setattr__(self, "demo_tasks", tuple(str(t) for t in self.demo_tasks))
        object.__setattr__(self, "generator_noise", tuple(float(r) for r in self.generator_noise))
        for name in ("corpus_noise", "reference_noise"):
            object.__setattr__(self, name, float(getattr(self, name)))
        self._validate()

    def _validate(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"invalid WorldConfig: {msg}")

        for f in fields(self):
            if f.type in ("int", int):
                v = getattr(self, f.name)
                if isinstance(v, bool) or not isinstance(v, int):
                    raise bad(f"{f.name} must be an int, got {v!r}")
        if not self.tasks:
            raise bad("tasks is empty")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise bad(f"unknown task(s) {unknown}; known tasks: {', '.join(TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise bad(f"duplicate task in {self.tasks}")
        outside = [t for t in self.demo_tasks if t not in self.tasks]
        if outside or len(set(self.demo_tasks)) != len(self.demo_tasks):
            raise bad(f"demo_tasks must be distinct tasks of tasks={list(self.tasks)}, got {list(self.demo_tasks)}")
        if not 2 <= self.num_symbols <= 10:
            raise bad(f"num_symbols must be in 2..10, got {self.num_symbols}")
        if not 1 <= self.min_len <= self.demo_max_len <= self.max_len:
            raise bad(
                "need 1 <= min_len <= demo_max_len <= max_len, got "
                f"{self.min_len}, {self.demo_max_len}, {self.max_len}"
            )
        if "count" in self.tasks and self.max_len > 9:
            raise bad(f"task 'count' needs max_len <= 9 (one-digit answers), got {self.max_len}")
        for name in ("n_demonstrations", "n_preference_prompts", "n_heldout_pairs", "n_eval", "n_corpus"):
            if getattr(self, name) < 0:
                raise bad(f"{name} must be >= 0")
        if self.responses_per_prompt < 2:
            raise bad(f"responses_per_prompt must be >= 2, got {self.responses_per_prompt}")
        if not self.generator_noise:
            raise bad("generator_noise is empty")
        for name, rates in (
            ("corpus_noise", (self.corpus_noise,)),
            ("reference_noise", (self.reference_noise,)),
            ("generator_noise", self.generator_noise),
        ):
            if any(not 0.0 <= r <= 1.0 for r in rates):
                raise bad(f"{name} must lie in [0, 1], got {getattr(self, name)}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None) -> WorldConfig:
        """Build from a dict or an OmegaConf ``DictConfig`` (lists become tuples).

        An unknown key raises ``ValueError`` naming it and listing the valid keys.
        Missing keys take their defaults.
        """
        if m is None:
            return cls()
        try:  # OmegaConf is a project dependency, but keep this module importable without it
            from omegaconf import DictConfig, OmegaConf

            if isinstance(m, DictConfig):
                m = OmegaConf.to_container(m, resolve=True)
        except ImportError:  # pragma: no cover
            pass
        if not isinstance(m, Mapping):
            raise ValueError(f"WorldConfig.from_mapping expects a mapping, got {type(m).__name__}")
        valid = cls.field_names()
        unknown = sorted(str(k) for k in m if k not in valid)
        if unknown:
            raise ValueError(f"unknown WorldConfig key(s) {unknown}; valid keys: {', '.join(valid)}")
        kwargs = {str(k): (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in m.items()}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of all fields (tuples become lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @property
    def demonstrated_tasks(self) -> tuple[str, ...]:
        """The tasks demonstrations are drawn from (``demo_tasks``, or every task)."""
        return self.demo_tasks or self.tasks

    @property
    def base_only_tasks(self) -> tuple[str, ...]:
        """Tasks the base model learns in pretraining and SFT never demonstrates."""
        return tuple(t for t in self.tasks if t not in self.demonstrated_tasks)

    def fingerprint(self) -> str:
        """Stable 16-hex-digit hash of the fields and :data:`WORLD_FORMAT_VERSION`: the toy base
        model's cache key (ibridge/models.py). ``demo_tasks`` is left out: it only chooses which
        prompts become demonstrations, which pretraining never sees (the corpus, the tokenizer
        and the eval prompts the corpus avoids do not depend on it), so a world that withholds
        tasks from SFT keeps the default world's base models, and the two are paired by base."""
        fields_ = {k: v for k, v in self.to_dict().items() if k != "demo_tasks"}
        payload = json.dumps({"format": WORLD_FORMAT_VERSION, **fields_}, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
