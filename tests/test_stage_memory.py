"""A stage gives its memory back before the evaluation (issue 20, item 7): the trained model even
when it holds reference cycles (FSDP2's does), DeepSpeed's engine, the `kl/token` reference
before the checksums; and the checksums gather one module at a time."""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch
from omegaconf import OmegaConf

import ibridge.distributed as distributed
from ibridge.distributed import DistInfo, parameter_checksums, shard
from ibridge.runtime import Runtime
from tests.conftest import compose_config
from tests.one_rank import one_rank_group
from tests.weighting_case import tiny_model

CPU = Runtime(device=torch.device("cpu"), precision="fp32")


@contextlib.contextmanager
def garbage_collector_off():
    """Only explicit gc.collect() calls free reference cycles inside the block, as on a busy
    GPU run where nothing triggers a full collection between a stage and its evaluation."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_an_fsdp2_sharded_model_outlives_del_without_a_collection():
    """The premise of the fix: ``del`` of an FSDP2-sharded model (and its optimiser) frees
    nothing until a garbage collection, because FSDP2's state holds reference cycles."""
    with one_rank_group() as info, garbage_collector_off():
        model = shard(tiny_model(), info, torch.device("cpu"), "fp32")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = torch.randint(1, 32, (2, 6))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        alive = weakref.ref(next(model.parameters()))
        del model, optimizer
        assert alive() is not None
        gc.collect()
        assert alive() is None


def test_train_stage_frees_a_model_with_reference_cycles_before_returning(tmp_path, model_cache, monkeypatch):
    """The trained model holds a reference cycle, as an FSDP2-sharded one does; with the garbage
    collector idle, it must be gone when train_stage returns (the evaluation loads next), and
    so must the `kl/token` reference, dropped before the checksums gather the model."""
    import ibridge.stages as stages
    from ibridge.data import source_for
    from ibridge.jobs.context import RunContext
    from ibridge.tracking import RunLogger

    cfg = compose_config(["debug=smoke", "logger=none", "sft.max_steps=2", "sft.save_every=0",
                          f"model.cache_dir={model_cache}"])
    logger = RunLogger(tmp_path, cfg.logger, OmegaConf.to_container(cfg, resolve=True), "test")
    ctx = RunContext(cfg=cfg, run_dir=tmp_path, runtime=CPU, logger=logger, source=source_for(cfg.data))
    trained, references = [], []
    original_load, original_close = stages.load_trainable, stages.HeldoutKL.close

    def load_with_a_cycle(init_path, ctx):
        model = original_load(init_path, ctx)
        model.__dict__["_cycle"] = [model]  # not a submodule: a plain reference back to itself
        trained.append(weakref.ref(model))
        return model

    def close(self):
        references.append(weakref.ref(self.reference))
        original_close(self)
        references.append(self.reference)

    monkeypatch.setattr(stages, "load_trainable", load_with_a_cycle)
    monkeypatch.setattr(stages.HeldoutKL, "close", close)
    base = ctx.base_model
    with garbage_collector_off():
        record = stages.train_stage(ctx, stage="sft", objective_cfg=cfg.objective, lr=float(cfg.lr),
                                    opt_cfg=cfg.sft, init_path=base, out_dir=tmp_path / "sft")
        assert record["steps"] == 2 and "kl_token" in record and record["kl_token_precision"] == "fp32"
        assert trained and trained[0]() is None, "the trained model outlived its stage"
    assert references[1] is None and references[0]() is None  # dropped at close, before the checksums


def test_checksums_gather_one_modules_parameters_at_a_time(monkeypatch):
    """Under ZeRO-3 the checksums gathered every parameter at once (and as float64 copies),
    while the `kl/token` reference was still alive; now one module's own parameters at a time,
    as `full_model_state` does, and the sum is still that of every parameter once."""
    model = tiny_model()
    sizes: list[int] = []

    @contextlib.contextmanager
    def recording_gather(module, info, parameters=None):
        params = list(parameters if parameters is not None else module.parameters())
        sizes.append(sum(p.numel() for p in params))
        yield

    monkeypatch.setattr(distributed, "gathered", recording_gather)
    monkeypatch.setattr(distributed, "CHECKSUM_ELEMENTS", 100, raising=False)  # several chunks per parameter
    zero3 = DistInfo(mode="deepspeed", zero_stage=3)
    (value,) = parameter_checksums(model, zero3)
    largest_module = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert max(sizes) == largest_module
    assert sum(sizes) == sum(p.numel() for p in model.parameters())  # every parameter once (tied ones too)
    expected = sum(float(p.detach().double().abs().sum()) for p in model.parameters())
    assert value == pytest.approx(expected, rel=1e-12)


def test_deepspeeds_engine_is_destroyed_when_the_loop_is_done(monkeypatch):
    """`optimise` tears DeepSpeed's engine down (`engine.destroy()`) once the stage's steps and
    checksums are done, so its optimiser's partitions can be freed with the model."""
    from tests.fake_deepspeed import FakeEngine, install

    install(monkeypatch)
    from ibridge.training import OptimSettings, optimise
    from tests.weighting_case import examples, parts

    _, compute, collate, count = parts("sft")
    runtime = Runtime(device=torch.device("cpu"), precision="fp32", dist=DistInfo(mode="deepspeed", zero_stage=2))
    optimise(tiny_model(), examples("sft"), collate, compute,
             OptimSettings(lr=1e-2, max_steps=2, batch_size=2, pack_sequences=False), runtime, count_units=count)
    assert [engine.destroyed for engine in FakeEngine.made] == [True]
