"""Building the splits of the toy world (docs/design.md §2); see :mod:`ibridge.world` for the overview."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from .config import WorldConfig
from .tasks import DIGITS, TASKS, judge_words, make_prompt

CORPUS_CORRUPTION_RATE = 0.3
"""Per-token error rate of a corrupted corpus answer (on top of one guaranteed error)."""

# probabilities of the three edit kinds when a token is hit by noise
_P_SUBSTITUTE = 0.6
_P_DELETE = 0.2  # the rest (0.2) inserts a random symbol after the token


def format_corpus_line(prompt: str, answer_words: Sequence[str]) -> str:
    """The pretraining format: ``format_corpus_line("sort 3 1 4", ["1", "3", "4"]) == "sort 3 1 4 = 1 3 4"``."""
    return f"{prompt} = {' '.join(answer_words)}"


def perturb(
    answer: Sequence[str],
    rate: float,
    rng: random.Random,
    alphabet: Sequence[str],
    *,
    at_least_one: bool = False,
) -> tuple[str, ...]:
    """A noisy "generator model" answer: each answer token is hit with probability ``rate``
    by a substitution (a different symbol), a deletion, or an insertion of a random symbol
    after it. Never returns an empty response (an empty result becomes one random symbol).
    With ``at_least_one`` the result is guaranteed to differ from ``answer``.
    """
    out: list[str] = []
    for tok in answer:
        if rate > 0.0 and rng.random() < rate:
            u = rng.random()
            if u < _P_SUBSTITUTE:
                out.append(_other(tok, rng, alphabet))
            elif u < _P_SUBSTITUTE + _P_DELETE:
                pass
            else:
                out.append(tok)
                out.append(rng.choice(alphabet))
        else:
            out.append(tok)
    if not out:
        out.append(rng.choice(alphabet))
    result = tuple(out)
    if at_least_one and result == tuple(answer):
        i = rng.randrange(len(out))
        out[i] = _other(out[i], rng, alphabet)
        result = tuple(out)
    return result


def _other(tok: str, rng: random.Random, alphabet: Sequence[str]) -> str:
    while True:
        s = rng.choice(alphabet)
        if s != tok:
            return s


@dataclass
class World:
    """All data of one toy world. ``corpus`` holds plain pretraining lines; the other
    fields are the splits returned by :meth:`splits` (see :mod:`ibridge.world`)."""

    config: WorldConfig
    corpus: list[str] = field(default_factory=list)
    demonstrations: list[dict] = field(default_factory=list)
    preferences: list[dict] = field(default_factory=list)
    heldout_pairs: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)

    def splits(self) -> dict[str, list]:
        """Split name -> list of records, for every split except the corpus."""
        return {
            "demonstrations": self.demonstrations,
            "preferences": self.preferences,
            "heldout_pairs": self.heldout_pairs,
            "eval": self.eval,
        }


class _PromptSampler:
    """Draws prompts: length uniform in [lo, hi], task uniform, symbols uniform."""

    def __init__(self, config: WorldConfig, tasks: tuple[str, ...] | None = None):
        self.tasks = tasks or config.tasks
        self.symbols = DIGITS[: config.num_symbols]

    def draw(self, rng: random.Random, lo: int, hi: int) -> tuple[str, tuple[str, ...]]:
        n = rng.randint(lo, hi)
        task = rng.choice(self.tasks)
        syms = tuple(rng.choices(self.symbols, k=n))
        return make_prompt(task, syms), TASKS[task](syms)


def _capacity(config: WorldConfig, lo: int, hi: int) -> int:
    return len(config.tasks) * sum(config.num_symbols**n for n in range(lo, hi + 1))


def _attempt_limit(n: int) -> int:
    return 50 * n + 1000


def _too_small(what: str, config: WorldConfig) -> ValueError:
    return ValueError(
        f"could not draw {what}: the prompt space of WorldConfig({config}) is too small; "
        "lower the split sizes or raise num_symbols / max_len"
    )


def _draw_unique(
    rng: random.Random, sampler: _PromptSampler, n: int, lo: int, hi: int, used: set[str], what: str, config
):
    """``n`` prompts not in ``used`` (which is updated), as ``(prompt, answer)`` pairs."""
    out = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > _attempt_limit(n):
            raise _too_small(f"{n} distinct {what} prompts", config)
        prompt, answer = sampler.draw(rng, lo, hi)
        if prompt in used:
            continue
        used.add(prompt)
        out.append((prompt, answer))
    return out


def _pair(
    prompt: str, answer: tuple[str, ...], rng: random.Random, config: WorldConfig, alphabet
) -> dict | None:
    """Best vs worst of ``responses_per_prompt`` candidates by the gold judge; None on a tie."""
    best = worst = None
    for _ in range(config.responses_per_prompt):
        rate = rng.choice(config.generator_noise)
        cand = perturb(answer, rate, rng, alphabet)
        r = judge_words(answer, cand).reward
        if best is None or r > best[0]:
            best = (r, cand)
        if worst is None or r < worst[0]:
            worst = (r, cand)
    if best[0] <= worst[0]:
        return None
    return {
        "prompt": prompt,
        "chosen": " ".join(best[1]),
        "rejected": " ".join(worst[1]),
        "chosen_reward": best[0],
        "rejected_reward": worst[0],
    }


def build_world(config: WorldConfig | None = None) -> World:
    """Build the toy world for ``config`` (default ``WorldConfig()``), deterministically.

    Each split has its own ``random.Random`` seeded from ``(seed, split name)``; global
    random state is never touched. Prompts are drawn in the order eval, held-out pairs,
    preferences, demonstrations, and no prompt enters two of these splits (a prompt that
    is already taken is redrawn, so when the short lengths run out the later splits get
    fewer short prompts than a uniform length draw would give). The corpus is drawn last,
    over the full length range, and excludes every eval prompt.
    """
    config = config or WorldConfig()
    lo, hi = config.min_len, config.max_len
    # cheap feasibility check before sampling (rejection sampling handles the rest)
    need_full = config.n_eval + config.n_heldout_pairs + config.n_preference_prompts + config.n_demonstrations
    demo_capacity = _capacity(config, lo, config.demo_max_len) * len(config.demonstrated_tasks) // len(config.tasks)
    if need_full > _capacity(config, lo, hi) or config.n_demonstrations > demo_capacity:
        raise _too_small(f"{need_full} distinct prompts", config)

    sampler = _PromptSampler(config)
    alphabet = sampler.symbols

    def rng_for(name: str) -> random.Random:
        return random.Random(f"ibridge.world:{config.seed}:{name}")

    used: set[str] = set()
    world = World(config=config)

    # eval: full length range, fixed outputs of a noisy reference generator (AlpacaEval references)
    rng = rng_for("eval")
    for prompt, answer in _draw_unique(rng, sampler, config.n_eval, lo, hi, used, "eval", config):
        ref = perturb(answer, config.reference_noise, rng, alphabet)
        world.eval.append(
            {
                "prompt": prompt,
                "reference": " ".join(ref),
                "reference_reward": judge_words(answer, ref).reward,
            }
        )
    eval_prompts = set(used)

    # held-out pairs: drawn until n_heldout_pairs non-tied pairs exist
    rng = rng_for("heldout_pairs")
    attempts = 0
    while len(world.heldout_pairs) < config.n_heldout_pairs:
        attempts += 1
        if attempts > _attempt_limit(config.n_heldout_pairs):
            raise _too_small(f"{config.n_heldout_pairs} non-tied held-out pairs", config)
        prompt, answer = sampler.draw(rng, lo, hi)
        if prompt in used:
            continue
        used.add(prompt)  # a tied prompt is consumed too: it stays out of the other splits
        pair = _pair(prompt, answer, rng, config, alphabet)
        if pair is not None:
            world.heldout_pairs.append(pair)

    # preferences: n_preference_prompts prompts, ties dropped (UltraFeedback binarized)
    rng = rng_for("preferences")
    drawn = _draw_unique(rng, sampler, config.n_preference_prompts, lo, hi, used, "preference", config)
    for prompt, answer in drawn:
        pair = _pair(prompt, answer, rng, config, alphabet)
        if pair is not None:
            world.preferences.append(pair)

    # demonstrations: clean answers on the narrower slice min_len..demo_max_len (UltraChat),
    # of the demonstrated tasks only (all of them unless demo_tasks withholds some)
    rng = rng_for("demonstrations")
    demo_sampler = _PromptSampler(config, config.demonstrated_tasks)
    drawn = _draw_unique(
        rng, demo_sampler, config.n_demonstrations, lo, config.demo_max_len, used, "demonstration", config
    )
    world.demonstrations = [{"prompt": p, "response": " ".join(a)} for p, a in drawn]

    # corpus: plain "prompt = answer" lines, a share corrupted; never an eval prompt
    rng = rng_for("corpus")
    attempts = 0
    while len(world.corpus) < config.n_corpus:
        attempts += 1
        if attempts > _attempt_limit(config.n_corpus):
            raise _too_small(f"{config.n_corpus} corpus lines outside eval", config)
        prompt, answer = sampler.draw(rng, lo, hi)
        if prompt in eval_prompts:
            continue
        if rng.random() < config.corpus_noise:
            answer = perturb(answer, CORPUS_CORRUPTION_RATE, rng, alphabet, at_least_one=True)
        world.corpus.append(format_corpus_line(prompt, answer))
    return world


def eval_slices(config: WorldConfig, prompts: Sequence[str]) -> dict[str, list[bool]]:
    """Named subsets of evaluation prompts, each scored as its own metric (gold reward on it).

    In a world that withholds tasks from the demonstrations (``demo_tasks``):
    ``retained_skill``, the prompts of base-only tasks, which only pretraining taught, so
    their gold reward after SFT measures what SFT kept of the base's knowledge; and
    ``taught_skill``, the prompts of demonstrated tasks. Empty for the default world.
    """
    if not config.base_only_tasks:
        return {}
    retained = [prompt.split(maxsplit=1)[0] in config.base_only_tasks for prompt in prompts]
    return {"retained_skill": retained, "taught_skill": [not r for r in retained]}
