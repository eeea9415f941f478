"""Settings that matter on GPUs, checked on the CPU: gradient checkpointing, no KV cache in
training, precision choices, and the collectives' devices (issue 14, items 1, 7, 8)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

import ibridge.distributed as distributed
from ibridge.config import ConfigError, validate
from ibridge.distributed import DistInfo, all_reduce_sum, parameter_checksums, process_group_backend
from ibridge.objectives import build_objective
from ibridge.runtime import Runtime, resolve_runtime
from ibridge.stages import demonstration_step, load_trainable
from ibridge.training import OptimSettings, optimise
from tests.conftest import compose_config
from tests.weighting_case import PAD, examples

CPU = Runtime(device=torch.device("cpu"), precision="fp32")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, attn_implementation="eager")
    folder = tmp_path_factory.mktemp("tiny") / "model"
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def _ctx(checkpointing: bool, lora: bool = False):
    cfg = OmegaConf.create({
        "trainer": {"gradient_checkpointing": checkpointing},
        "model": {"lora": {"enabled": lora, "r": 4, "alpha": 8, "dropout": 0.0,
                           "target_modules": ["q_proj", "v_proj"]}},
    })
    return SimpleNamespace(cfg=cfg, runtime=CPU)


def _train(model, steps: int = 3):
    from ibridge.data.collate import collate_demonstrations

    sft = build_objective({"name": "sft"})
    settings = OptimSettings(lr=1e-2, max_steps=steps, batch_size=3, log_every=1, pack_sequences=False)
    optimise(model, examples("sft"), lambda items: collate_demonstrations(items, PAD), demonstration_step(sft),
             settings, CPU)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_gradient_checkpointing_trains_exactly_as_without(tiny_folder):
    torch.set_num_threads(1)
    plain = load_trainable(tiny_folder, _ctx(False))
    checkpointed = load_trainable(tiny_folder, _ctx(True))
    flag = "is_activation_checkpointing" if hasattr(plain, "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert getattr(checkpointed, flag) and not getattr(plain, flag)
    before = {name: p.detach().clone() for name, p in plain.named_parameters()}
    after_plain, after_ckpt = _train(plain), _train(checkpointed)
    assert any(not torch.equal(before[n], after_plain[n]) for n in before)
    for name, value in after_plain.items():
        torch.testing.assert_close(after_ckpt[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_lora_with_gradient_checkpointing_trains_its_adapters(tiny_folder):
    model = load_trainable(tiny_folder, _ctx(True, lora=True))
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    after = _train(model, steps=2)
    assert any(not torch.equal(adapters[n], after[n]) for n in adapters)


def test_training_forwards_build_no_kv_cache(tiny_folder):
    model = load_trainable(tiny_folder, _ctx(False))
    seen = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs.get("use_cache")), with_kwargs=True)
    _train(model, steps=1)
    assert seen and all(flag is False for flag in seen)


def test_fp16_outside_deepspeed_is_a_config_error_and_inside_it_is_not():
    with pytest.raises(ConfigError, match="trainer.precision=fp16"):
        validate(compose_config(["trainer.precision=fp16"]))
    validate(compose_config(["trainer=deepspeed", "trainer.precision=fp16"]))


def test_auto_precision_never_picks_emulated_bf16(monkeypatch):
    # A pre-Ampere GPU: bf16 "supported" only through emulation.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    runtime = resolve_runtime(OmegaConf.create({"device": "cuda", "precision": "auto", "attn_implementation": "eager"}))
    assert runtime.precision == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and later
    runtime = resolve_runtime(OmegaConf.create({"device": "cuda", "precision": "auto", "attn_implementation": "eager"}))
    assert runtime.precision == "bf16"


def test_gpu_process_groups_take_cpu_tensors_too():
    assert process_group_backend("cuda") == "cpu:gloo,cuda:nccl"
    assert process_group_backend("cpu") == "gloo"


def test_ibridges_collectives_build_their_tensors_on_the_collective_device(monkeypatch, tiny_folder):
    # NCCL accepts only CUDA tensors: every collective of ibridge's own must place its tensor on
    # DistInfo.collective_device. On a CPU machine the only real device is the CPU, which is also
    # torch's default, so the calls run under another default device ("meta"): a tensor built
    # without the setting lands there and the spies, standing in for a device-only backend, see it.
    devices = []

    def all_reduce(tensor, op=None):
        devices.append(str(tensor.device))
        tensor.mul_(2)  # as if a second rank held the same values

    def all_gather(outputs, tensor):
        devices.extend(str(t.device) for t in [tensor, *outputs])
        for rank, out in enumerate(outputs):
            out.copy_(tensor + rank)  # rank r's checksum: this rank's + r, so the values come from the buffers

    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(distributed.dist, "all_gather", all_gather)
    info = DistInfo(world_size=2, mode="ddp", collective_device="cpu")
    model = LlamaForCausalLM.from_pretrained(tiny_folder)
    with torch.device("meta"):
        summed = all_reduce_sum([1.0, 2.0], info)
        first, second = parameter_checksums(model, info)
    assert summed == [2.0, 4.0]
    assert first > 0 and second == pytest.approx(first + 1)
    assert devices == ["cpu", "cpu", "cpu", "cpu"]


def test_deepspeed_reduces_and_accumulates_gradients_in_fp32():
    from ibridge.zero import engine_config

    config = engine_config(batch_size=2, grad_accum=4, max_grad_norm=1.0, precision="bf16", zero_stage=3)
    assert config["bf16"] == {"enabled": True}
    assert config["communication_data_type"] == "fp32"
    assert config["data_types"] == {"grad_accum_dtype": "fp32"}


def test_the_reference_pass_runs_on_the_weights_training_runs_on():
    from ibridge.models import reference_pass_dtype

    gpu = torch.device("cuda")  # a device object only: nothing is allocated
    assert reference_pass_dtype(Runtime(device=gpu, precision="bf16")) == torch.float32  # autocast over fp32
    assert reference_pass_dtype(Runtime(device=gpu, precision="bf16", lora=True)) == torch.bfloat16  # bf16 frozen base
    fsdp = DistInfo(world_size=8, mode="fsdp")
    assert reference_pass_dtype(Runtime(device=gpu, precision="bf16", dist=fsdp)) == torch.bfloat16
    assert reference_pass_dtype(Runtime(device=gpu, precision="fp32", dist=fsdp)) == torch.float32


@pytest.mark.parametrize(("overrides", "expected"), [
    (["model=llama3_8b"], True),
    (["model=llama3_8b", "trainer=fsdp"], True),
    (["model=mistral_7b", "trainer=ddp", "model.lora.enabled=true"], True),
    (["model=llama3_8b", "trainer=fsdp", "trainer.gradient_checkpointing=false"], False),
    (["model=qwen2_5_0_5b"], False),
    (["model=qwen2_5_0_5b", "trainer.gradient_checkpointing=true"], True),
    ([], False),
])
def test_7_8b_models_checkpoint_activations_unless_told_not_to(overrides, expected):
    """The documented 8B FSDP and LoRA commands exceed 80 GB without gradient checkpointing
    (docs/real_setting.md, "Memory per GPU"): ``trainer.gradient_checkpointing=auto`` (the
    default) takes the 7-8B model configs' ``gradient_checkpointing: true`` (issue 20, item 4)."""
    from ibridge.resource_config import gradient_checkpointing

    cfg = compose_config(overrides)
    validate(cfg)
    assert gradient_checkpointing(cfg) is expected


def test_auto_gradient_checkpointing_reaches_the_loaded_model(tiny_folder):
    ctx = _ctx(False)
    ctx.cfg.trainer.gradient_checkpointing = "auto"
    ctx.cfg.model.gradient_checkpointing = True  # as conf/model/llama3_8b.yaml says
    model = load_trainable(tiny_folder, ctx)
    flag = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert getattr(model, flag)


@pytest.mark.parametrize(("override", "key"), [
    ("trainer.gradient_checkpointing=sometimes", "trainer.gradient_checkpointing"),
    ("sft.save_every_min=-1", "sft.save_every_min"),
    ("eval.max_batch_tokens=0", "eval.max_batch_tokens"),
    ("trainer.tf32=maybe", "trainer.tf32"),
    ("trainer.attn_implementation=flash_attention_2", "trainer.attn_implementation"),
])
def test_resource_settings_are_checked_before_any_model_loads(override, key):
    overrides = [override] + (["trainer.precision=fp32"] if "attn" in override else [])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_config(overrides))


def test_the_torch_floor_is_a_release_with_the_fsdp2_api_ibridge_imports():
    """``from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy`` needs torch 2.6;
    pyproject.toml allowed 2.4, where trainer=fsdp failed at its import (issue 20, item 3)."""
    import re

    from packaging.version import Version

    from ibridge.distributed import FSDP2_MIN_TORCH
    from tests.conftest import REPO

    floors = re.findall(r'"torch>=([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    assert len(floors) == 1
    assert Version(floors[0]) >= Version(FSDP2_MIN_TORCH) == Version("2.6")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: F401  (the import shard() makes)
