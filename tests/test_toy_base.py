"""The toy base model's cache key: what identifies a base, and what does not."""

from omegaconf import OmegaConf

from ibridge.data import source_for
from ibridge.models import pretrain_seed, toy_base_key
from tests.conftest import compose_config


def _key(*overrides):
    cfg = compose_config(list(overrides))
    world = source_for(cfg.data).world_config
    return toy_base_key(cfg.model, world), pretrain_seed(cfg.model, world), world.seed


def test_pretrain_seed_defaults_to_the_world_seed_without_changing_the_key():
    key, seed, world_seed = _key()
    assert seed == world_seed
    cfg = compose_config([])
    without_option = OmegaConf.to_container(cfg.model, resolve=True)
    del without_option["pretrain"]["seed"]  # a config from before the option existed
    without_option = OmegaConf.create(without_option)
    assert toy_base_key(without_option, source_for(cfg.data).world_config) == key


def test_another_pretrain_seed_or_recipe_is_another_base():
    default, _, _ = _key()
    reseeded, seed, _ = _key("model.pretrain.seed=7")
    assert seed == 7 and reseeded != default
    assert _key("model.pretrain.lr=1e-3")[0] != default
