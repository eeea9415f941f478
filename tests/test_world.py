"""Tests of the toy world (ibridge.world, docs/design.md §2)."""

from __future__ import annotations

import random

import pytest

from ibridge.world import (
    SPECIAL_TOKENS,
    TASKS,
    Judgement,
    World,
    WorldConfig,
    build_tokenizer,
    build_world,
    format_corpus_line,
    judge,
    perturb,
    solve,
)

SMALL = dict(n_demonstrations=60, n_preference_prompts=60, n_heldout_pairs=20, n_eval=20, n_corpus=300)


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(WorldConfig())


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(WorldConfig())


def _n_symbols(prompt: str) -> int:
    return len(prompt.split()) - 1


def _corpus_prompt(line: str) -> str:
    prompt, sep, answer = line.partition(" = ")
    assert sep and answer, line
    return prompt


# ---------------------------------------------------------------- judge and solve


@pytest.mark.parametrize(
    "prompt,answer",
    [
        ("sort 3 1 4 1", ("1", "1", "3", "4")),
        ("reverse 1 2 3", ("3", "2", "1")),
        ("max 3 9 2", ("9",)),
        ("min 3 9 2", ("2",)),
        ("add1 9 0 5", ("0", "1", "6")),
        ("count 7 7 7", ("3",)),
        ("first 5 1", ("5",)),
        ("last 5 1", ("1",)),
        ("sum 9 5", ("4",)),
    ],
)
def test_solve_hand_examples(prompt, answer):
    assert solve(prompt) == answer


@pytest.mark.parametrize(
    "response,reward,first_error",
    [
        ("1 3 4", 1.0, None),  # exact
        ("  1   3 4 ", 1.0, None),  # whitespace does not matter
        ("3 1 4", 0.0, 0),  # wrong at position 0
        ("1 9 4", 1 / 3, 1),  # wrong in the middle
        ("1 3", 2 / 3, 2),  # strict prefix: the missing token
        ("1", 1 / 3, 1),
        ("1 3 4 4 4", 3 / 5, 3),  # extra tokens are penalised
        ("1 9 4 5", 1 / 4, 1),  # wrong and too long
        ("", 0.0, 0),  # empty
    ],
)
def test_judge_hand_cases(response, reward, first_error):
    j = judge("sort 3 1 4", response)
    assert isinstance(j, Judgement)
    assert j.reward == pytest.approx(reward)
    assert j.first_error == first_error
    assert j.answer == ("1", "3", "4")


def test_judge_single_token_tasks():
    assert judge("max 3 9 2", "9") == Judgement(1.0, None, ("9",))
    assert judge("max 3 9 2", "3") == Judgement(0.0, 0, ("9",))
    assert judge("max 3 9 2", "9 2") == Judgement(0.5, 1, ("9",))


@pytest.mark.parametrize("prompt", ["dance 1 2", "sort", "", "sort a b", "sort 1 12", "= 1 2"])
def test_unparseable_prompt_raises_naming_it(prompt):
    with pytest.raises(ValueError) as e:
        judge(prompt, "1")
    assert repr(prompt) in str(e.value)


def test_reward_always_in_unit_interval(world):
    rng = random.Random(0)
    vocab = ["0", "1", "5", "9", "=", "sort", "<eos>"]
    for task in TASKS:
        for _ in range(200):
            prompt = " ".join([task] + rng.choices("0123456789", k=rng.randint(1, 8)))
            response = " ".join(rng.choices(vocab, k=rng.randint(0, 12)))
            j = judge(prompt, response)
            assert 0.0 <= j.reward <= 1.0
            assert (j.reward == 1.0) == (j.first_error is None)
    for pair in world.preferences + world.heldout_pairs:
        assert 0.0 <= pair["rejected_reward"] < pair["chosen_reward"] <= 1.0


def test_perturb_never_empty_and_at_least_one():
    rng = random.Random(1)
    alphabet = list("0123456789")
    for _ in range(500):
        answer = tuple(rng.choices(alphabet, k=rng.randint(1, 6)))
        assert perturb(answer, 0.0, rng, alphabet) == answer
        assert len(perturb(answer, 1.0, rng, alphabet)) >= 1
        assert perturb(answer, 0.0, rng, alphabet, at_least_one=True) != answer


# ---------------------------------------------------------------- config


def test_from_mapping_and_fingerprint():
    cfg = WorldConfig.from_mapping({"seed": 3, "tasks": ["sort", "max"], "n_eval": 10})
    assert cfg == WorldConfig(seed=3, tasks=("sort", "max"), n_eval=10)
    assert isinstance(cfg.tasks, tuple)
    assert WorldConfig.from_mapping({}) == WorldConfig()
    fp = WorldConfig().fingerprint()
    assert fp == WorldConfig().fingerprint() and len(fp) == 16 and int(fp, 16) >= 0
    assert fp != WorldConfig(seed=1).fingerprint()
    assert fp != WorldConfig(generator_noise=(0.0, 0.5)).fingerprint()
    hash(cfg)  # frozen and hashable


def test_from_mapping_omegaconf():
    from omegaconf import OmegaConf

    m = OmegaConf.create({"seed": 2, "tasks": ["reverse"], "generator_noise": [0.0, 0.2]})
    assert WorldConfig.from_mapping(m) == WorldConfig(seed=2, tasks=("reverse",), generator_noise=(0.0, 0.2))


def test_from_mapping_unknown_key():
    with pytest.raises(ValueError) as e:
        WorldConfig.from_mapping({"seed": 0, "n_evals": 5})
    msg = str(e.value)
    assert "n_evals" in msg and "n_eval," in msg and "demo_max_len" in msg


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(tasks=("sort", "fly")),
        dict(tasks=()),
        dict(num_symbols=11),
        dict(min_len=3, demo_max_len=2),
        dict(demo_max_len=9, max_len=8),
        dict(max_len=10, demo_max_len=5),  # count needs one-digit answers
        dict(corpus_noise=1.5),
        dict(responses_per_prompt=1),
        dict(n_eval=2.5),
    ],
)
def test_invalid_config(kwargs):
    with pytest.raises(ValueError):
        WorldConfig(**kwargs)


def test_prompt_space_too_small():
    cfg = WorldConfig(num_symbols=2, min_len=2, demo_max_len=2, max_len=2, tasks=("sort",), **SMALL)
    with pytest.raises(ValueError, match="too small"):
        build_world(cfg)


# ---------------------------------------------------------------- world


def test_determinism():
    cfg = WorldConfig(seed=1, **SMALL)
    a, b = build_world(cfg), build_world(WorldConfig(seed=1, **SMALL))
    assert a == b
    c = build_world(WorldConfig(seed=2, **SMALL))
    assert a.corpus != c.corpus and a.eval != c.eval and a.demonstrations != c.demonstrations


def test_split_sizes_and_shapes(world):
    cfg = world.config
    assert set(world.splits()) == {"demonstrations", "preferences", "heldout_pairs", "eval"}
    assert len(world.demonstrations) == cfg.n_demonstrations
    assert len(world.heldout_pairs) == cfg.n_heldout_pairs
    assert len(world.eval) == cfg.n_eval
    assert len(world.corpus) == cfg.n_corpus
    assert cfg.n_preference_prompts // 2 < len(world.preferences) <= cfg.n_preference_prompts
    pair_keys = {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}
    assert all(set(p) == pair_keys for p in world.preferences + world.heldout_pairs)
    assert all(set(d) == {"prompt", "response"} for d in world.demonstrations)
    assert all(set(e) == {"prompt", "reference", "reference_reward"} for e in world.eval)


def test_splits_disjoint_and_unique(world):
    prompts = {name: [r["prompt"] for r in split] for name, split in world.splits().items()}
    for name, ps in prompts.items():
        assert len(set(ps)) == len(ps), f"duplicate prompt in {name}"
    names = list(prompts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not set(prompts[a]) & set(prompts[b]), (a, b)


def test_corpus_format_and_no_eval_prompts(world):
    eval_prompts = {e["prompt"] for e in world.eval}
    corpus_prompts = [_corpus_prompt(line) for line in world.corpus]
    assert not eval_prompts & set(corpus_prompts)
    assert not any(t in line for line in world.corpus for t in SPECIAL_TOKENS.values())
    wrong = sum(
        format_corpus_line(p, solve(p)) != line for p, line in zip(corpus_prompts, world.corpus, strict=True)
    )
    assert 0.2 < wrong / len(world.corpus) < 0.3  # corpus_noise = 0.25
    assert format_corpus_line("sort 3 1 4", ["1", "3", "4"]) == "sort 3 1 4 = 1 3 4"


def test_lengths(world):
    cfg = world.config
    demo_lens = {_n_symbols(d["prompt"]) for d in world.demonstrations}
    assert min(demo_lens) >= cfg.min_len and max(demo_lens) == cfg.demo_max_len
    for name in ("eval", "preferences", "heldout_pairs"):
        lens = {_n_symbols(r["prompt"]) for r in world.splits()[name]}
        assert min(lens) == cfg.min_len and max(lens) == cfg.max_len, name
    corpus_lens = {_n_symbols(_corpus_prompt(line)) for line in world.corpus}
    assert min(corpus_lens) == cfg.min_len and max(corpus_lens) == cfg.max_len
    assert {r["prompt"].split()[0] for r in world.demonstrations} == set(cfg.tasks)


def test_rewards_are_the_judges(world):
    for d in world.demonstrations:
        assert judge(d["prompt"], d["response"]).reward == 1.0
    for p in world.preferences + world.heldout_pairs:
        assert p["chosen_reward"] > p["rejected_reward"]
        assert judge(p["prompt"], p["chosen"]).reward == p["chosen_reward"]
        assert judge(p["prompt"], p["rejected"]).reward == p["rejected_reward"]
        assert p["chosen"].strip() and p["rejected"].strip()
    for e in world.eval:
        assert judge(e["prompt"], e["reference"]).reward == e["reference_reward"]
    mean_ref = sum(e["reference_reward"] for e in world.eval) / len(world.eval)
    assert 0.3 < mean_ref < 0.98  # an imperfect reference leaves room to win


# ---------------------------------------------------------------- tokenizer

GEN = "<|user|> sort 3 1 4 <|end|> <|assistant|>"
FULL = "<|user|> sort 3 1 4 <|end|> <|assistant|> 1 3 4 <eos>"
USER = [{"role": "user", "content": "sort 3 1 4"}]
CONV = USER + [{"role": "assistant", "content": "1 3 4"}]


def _check_tokenizer(t):
    assert t.apply_chat_template(USER, tokenize=False, add_generation_prompt=True) == GEN
    assert t.apply_chat_template(CONV, tokenize=False) == FULL
    assert (t.pad_token, t.bos_token, t.eos_token, t.unk_token) == ("<pad>", "<bos>", "<eos>", "<unk>")
    ids = t(FULL)["input_ids"]
    assert len(ids) == len(FULL.split())  # word level, nothing added
    assert ids[-1] == t.eos_token_id and t.unk_token_id not in ids
    assert t(GEN)["input_ids"] == ids[: len(GEN.split())]
    assert t.decode(ids, skip_special_tokens=True) == "sort 3 1 4 1 3 4"
    assert t.decode(t("1 3 4")["input_ids"], skip_special_tokens=True) == "1 3 4"
    assert t.decode(ids) == FULL
    assert t.convert_tokens_to_ids("=") != t.unk_token_id
    assert t("fly 1")["input_ids"][0] == t.unk_token_id


def test_tokenizer(tok):
    _check_tokenizer(tok)
    assert tok.pad_token_id == 0
    with pytest.raises(Exception, match="user and assistant"):
        tok.apply_chat_template([{"role": "system", "content": "hi"}] + USER, tokenize=False)


def test_tokenizer_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    _check_tokenizer(loaded)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.chat_template == tok.chat_template
    assert set(SPECIAL_TOKENS.values()) <= set(loaded.all_special_tokens)


def test_world_text_has_no_unknown_words(world, tok):
    vocab = tok.get_vocab()
    words = {w for line in world.corpus for w in line.split()}
    for split in world.splits().values():
        for r in split:
            for v in r.values():
                if isinstance(v, str):
                    words.update(v.split())
    assert words <= set(vocab)
