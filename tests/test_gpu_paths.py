"""GPU code paths of issue 20, driven on the CPU: what a sharded model, a flash-attention run
or a bf16 runtime does differently, simulated as the GPU would run it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ibridge.data.formatting import encode_split
from ibridge.distributed import shard
from ibridge.evaluation.drift import token_kl
from ibridge.objectives.logprobs import token_logps
from ibridge.packing import PackedForward, takes_logits_mask
from ibridge.runtime import Runtime
from tests import simulated_flash
from tests.conftest import compose_config
from tests.one_rank import one_rank_group

CPU = torch.device("cpu")
CONFIG = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=64, attn_implementation="eager")


def batch(seed: int = 0, rows: int = 3, width: int = 12) -> dict:
    """Right-padded rows, a prompt of 4 unscored tokens each."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, CONFIG.vocab_size, (rows, width), generator=generator)
    lengths = torch.tensor([width - 3 * r for r in range(rows)])
    mask = (torch.arange(width) < lengths.unsqueeze(1)).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def test_an_fsdp2_sharded_model_gets_logits_at_scored_tokens_only():
    """``fully_shard`` replaces the model's class by ``FSDPLlamaForCausalLM``, defined in torch:
    `takes_logits_mask` must still find the modeling code's ``slice_logits_to_keep`` (issue 20,
    item 13), so that the head runs at the S scored tokens, not at all B x T positions."""
    torch.manual_seed(0)
    plain = LlamaForCausalLM(CONFIG)
    inputs = batch()
    expected, mask = token_logps(plain(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits,
                                 inputs["labels"])
    with one_rank_group() as info:
        model = shard(plain, info, CPU, "fp32")
        assert type(model).__name__ == "FSDPLlamaForCausalLM"
        assert takes_logits_mask(model)
        rows = []
        model.lm_head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[:-1].numel()))
        logps, scored = PackedForward(model, pack=False).scored_logps(**inputs)
    assert rows == [int(mask.sum())]  # the head saw the scored tokens only
    assert torch.equal(scored, mask)
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-6)


class RemoteCodeModel(LlamaForCausalLM):
    """Stands for modeling code outside transformers (``trust_remote_code``), in a module (this
    one) that does not slice with ``slice_logits_to_keep``."""


def test_the_logits_mask_check_reads_the_models_own_class_not_its_bases():
    """Looking through the MRO for FSDP2 must not make every model qualify through transformers'
    own base classes, which sit beside ``slice_logits_to_keep`` in transformers.modeling_utils."""
    from peft import LoraConfig, get_peft_model

    assert takes_logits_mask(get_peft_model(LlamaForCausalLM(CONFIG), LoraConfig(r=2, target_modules=["q_proj"])))
    assert not takes_logits_mask(RemoteCodeModel(CONFIG))


# --------------------------------------------------------------------------- flash attention, fp32 scoring


@pytest.fixture(scope="module")
def toy(model_cache):
    """The smoke world's config, data source, base model folder and tokenizer."""
    from ibridge.data import source_for
    from ibridge.models import ensure_toy_base, load_tokenizer

    cfg = compose_config(["debug=smoke", f"model.cache_dir={model_cache}", "eval.num_prompts=8",
                          "eval.max_new_tokens=6", "eval.bootstrap_resamples=50"])
    source = source_for(cfg.data)
    base = ensure_toy_base(cfg.model, source.world_config, Runtime(device=CPU, precision="fp32"))
    return SimpleNamespace(cfg=cfg, source=source, base=base, tokenizer=load_tokenizer(base))


def perturbed(model, scale: float = 0.05):
    """`model` moved away from its reference, as a trained policy is."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1 + scale * torch.randn(param.shape, generator=generator))
    return model


def bf16_runtime(attn: str) -> Runtime:
    """A GPU's ``precision=bf16`` run, on the CPU: autocast to bf16 over fp32 weights."""
    return Runtime(device=CPU, precision="bf16", attn_implementation=attn)


def test_kl_token_runs_under_flash_attention_and_equals_the_sdpa_value(toy, monkeypatch):
    """With flash-attention (simulated: transformers' dtype logic and flash-attn's dtype check),
    an SFT stage's training forward runs under bf16 autocast, but `kl/token` compares fp32
    forwards without autocast: today's code raised "FlashAttention only support fp16 and bf16
    data type" there, after the last training step (issue 20, item 1). It must run with sdpa
    for that pass, give what sdpa gives, and leave the policy on flash for training."""
    from ibridge.models import load_model
    from ibridge.stages import drift_evaluator

    attn = simulated_flash.register(monkeypatch)
    runtime = bf16_runtime(attn)
    policy = perturbed(load_model(toy.base, runtime))
    assert policy.config._attn_implementation == attn
    ids = torch.tensor([[1, 5, 6, 7]])
    with runtime.autocast():
        policy(input_ids=ids)  # a training forward: flash gets bf16 under autocast
    assert simulated_flash.CALLS and set(simulated_flash.CALLS) == {torch.bfloat16}
    ctx = SimpleNamespace(cfg=toy.cfg, source=toy.source, runtime=runtime)
    evaluate = drift_evaluator(ctx, toy.tokenizer, toy.base)
    value = evaluate(policy)["kl/token"]
    assert policy.config._attn_implementation == attn  # switched back for training
    heldout, _ = encode_split(toy.tokenizer, toy.source.examples("heldout_demonstrations"), "demonstrations",
                              int(toy.cfg.model.max_length))
    sdpa = Runtime(device=CPU, precision="fp32", attn_implementation="sdpa")
    policy.set_attn_implementation("sdpa")
    expected = token_kl(policy, load_model(toy.base, sdpa, for_inference=True), heldout, sdpa,
                        toy.tokenizer.pad_token_id)
    assert expected > 1e-4
    assert value == pytest.approx(expected, rel=1e-6)


def kv_cache_dtypes(model) -> set:
    """Record (keys, values) dtypes of every KV cache `model` builds while generating."""
    seen: set = set()

    def hook(module, args, out):
        cache = getattr(out, "past_key_values", None)
        for layer in getattr(cache, "layers", None) or []:
            if getattr(layer, "keys", None) is not None:
                seen.add((layer.keys.dtype, layer.values.dtype))

    model.register_forward_hook(hook)
    return seen


def test_evaluation_generates_on_bf16_weights_and_scores_in_fp32_under_flash(toy, tmp_path, monkeypatch):
    """The evaluation under flash attention (simulated) at ``precision=bf16``: generation on bf16
    weights, so the KV cache is bf16 throughout (fp32 weights under autocast gave fp32 keys
    beside bf16 values, 1.5x the cache, issue 20 item 5), and the fp32 scoring passes
    (`kl_to_ref`, `implicit_reward_acc`) on fp32 weights with sdpa, which today raised (item 1).
    The metrics equal those of the same evaluation with sdpa throughout."""
    import ibridge.evaluation.evaluate as evaluate_module
    from ibridge.models import load_model, save_checkpoint

    attn = simulated_flash.register(monkeypatch)
    save_checkpoint(perturbed(load_model(toy.base, Runtime(device=CPU, precision="fp32"))), toy.tokenizer,
                    tmp_path / "policy")
    caches: list[set] = []
    original_load = evaluate_module.load_model

    def spying_load(*args, **kwargs):
        model = original_load(*args, **kwargs)
        caches.append(kv_cache_dtypes(model))
        return model

    monkeypatch.setattr(evaluate_module, "load_model", spying_load)
    sdpa = evaluate_module.evaluate_checkpoint(toy.cfg, toy.source, tmp_path / "policy", toy.base,
                                               bf16_runtime("sdpa"), tmp_path / "sdpa", "policy")
    assert [seen for seen in caches if seen] == [{(torch.bfloat16, torch.bfloat16)}], caches
    flash = evaluate_module.evaluate_checkpoint(toy.cfg, toy.source, tmp_path / "policy", toy.base, bf16_runtime(attn),
                                                tmp_path / "flash", "policy")
    generated = [seen for seen in caches if seen]  # the models that generated (scoring builds no cache)
    assert len(generated) == 2 and all(seen == {(torch.bfloat16, torch.bfloat16)} for seen in generated), caches
    assert {"kl_to_ref", "implicit_reward_acc", "win_rate"} <= flash.keys()
    for key, value in sdpa.items():
        assert flash[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key


def test_scoring_models_load_with_an_attention_that_runs_in_their_dtype(toy, monkeypatch):
    from ibridge.scoring import load_scoring_model

    attn = simulated_flash.register(monkeypatch)
    runtime = bf16_runtime(attn)
    fp32 = load_scoring_model(toy.base, runtime)
    assert fp32.config._attn_implementation == "sdpa" and fp32.dtype == torch.float32
    bf16 = load_scoring_model(toy.base, runtime, dtype=torch.bfloat16)
    assert bf16.config._attn_implementation == attn  # flash runs bf16 weights as they are
    ids = torch.tensor([[1, 5, 6, 7]])
    assert fp32(input_ids=ids).logits.dtype == torch.float32
    bf16(input_ids=ids)


# --------------------------------------------------------------------------- generation batches


def test_generation_batches_hold_at_most_the_token_budget():
    from ibridge.evaluation.generate import generation_batches

    lengths = [3, 50, 7, 200, 9, 11, 120, 4, 60, 5]
    batches = generation_batches(lengths, max_new_tokens=20, batch_size=4, max_tokens=300)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 4
        assert len(batch) == 1 or len(batch) * (max(lengths[i] for i in batch) + 20) <= 300, batch
    assert [200] in [[lengths[i] for i in batch] for batch in batches]  # longer than the budget: alone
    # Where the budget does not bind, the batches are the batch_size blocks of the length order.
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    assert generation_batches(lengths, 20, 4, 10**9) == [order[0:4], order[4:8], order[8:]]


def test_generate_keeps_every_batch_within_the_token_budget_and_its_outputs(toy):
    """A rank that draws the longest prompts must not hold more KV cache than the budget
    (issue 20, item 5: 128 rows whatever their length ran out of memory at ``eval/base``); the
    greedy outputs are those of unbounded batches."""
    from ibridge.evaluation.generate import generate
    from ibridge.models import load_model

    runtime = Runtime(device=CPU, precision="fp32")
    model = load_model(toy.base, runtime, for_inference=True)
    prompts = [example["prompt"] for example in toy.source.examples("eval")[:24]]
    shapes = []
    original = model.generate

    def spy(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return original(*args, **kwargs)

    model.generate = spy
    free = generate(model, toy.tokenizer, prompts, runtime, 6, 64, desc=None)
    assert len(shapes) == 1
    widest = shapes[0][1]
    shapes.clear()
    budget = 4 * (widest + 6)
    bounded = generate(model, toy.tokenizer, prompts, runtime, 6, 64, desc=None, max_batch_tokens=budget)
    assert len(shapes) > 1 and all(rows * (width + 6) <= budget for rows, width in shapes), shapes
    assert [out["response_ids"] for out in bounded] == [out["response_ids"] for out in free]


# --------------------------------------------------------------------------- TF32 in fp32 scoring


def test_fp32_scoring_runs_tf32_matmuls_on_gpus_only_and_restores_the_setting():
    """TF32 inside fp32 scoring passes on a GPU (``trainer.tf32``, default true; issue 20,
    item 14), never left on for training or the reference pass (whose cache key records the
    setting). The setting is a process-wide flag, so it is checked here without a GPU."""
    from ibridge.scoring import fp32_matmuls

    before = torch.get_float32_matmul_precision()
    gpu = torch.device("cuda")  # a device object only: nothing is allocated
    with fp32_matmuls(Runtime(device=gpu, precision="bf16")):
        assert torch.get_float32_matmul_precision() == "high"  # TF32
    assert torch.get_float32_matmul_precision() == before
    with fp32_matmuls(Runtime(device=gpu, precision="bf16", tf32=False)):
        assert torch.get_float32_matmul_precision() == before
    with fp32_matmuls(Runtime(device=CPU, precision="fp32")):
        assert torch.get_float32_matmul_precision() == before


def test_every_fp32_scoring_pass_asks_for_tf32(toy, monkeypatch):
    """`kl/token` and the evaluation's `sequence_logps` run inside `fp32_matmuls` with the run's
    ``trainer.tf32`` (as does ``ibridge qlogit``'s analysis, in ibridge/jobs/qlogit.py)."""
    import contextlib

    import ibridge.evaluation.drift as drift
    from ibridge.models import load_model

    entered = []

    @contextlib.contextmanager
    def recording(runtime):
        entered.append(runtime.tf32)
        yield

    monkeypatch.setattr(drift, "fp32_matmuls", recording)
    runtime = Runtime(device=CPU, precision="fp32", tf32=False)
    model = load_model(toy.base, runtime, for_inference=True)
    heldout, _ = encode_split(toy.tokenizer, toy.source.examples("heldout_demonstrations")[:4], "demonstrations",
                              int(toy.cfg.model.max_length))
    drift.token_kl(model, model, heldout, runtime, toy.tokenizer.pad_token_id)
    drift.sequence_logps(model, heldout, runtime, toy.tokenizer.pad_token_id)
    assert entered == [False, False]


# --------------------------------------------------------------------------- kl/token precision


def test_kl_token_compares_the_policy_with_a_reference_in_the_same_precision(toy):
    """Where training's forward runs on bf16 weights (DeepSpeed's and FSDP's bf16, LoRA's bf16
    base), `kl/token` compared that bf16 policy with an fp32 reference: at step 0, policy ==
    reference, it read the two numerics' difference instead of 0 (issue 20, item 11). The
    reference now loads in the policy's dtype, and the stage record names it."""
    from ibridge.distributed import DistInfo
    from ibridge.models import load_model
    from ibridge.stages import drift_evaluator

    runtime = Runtime(device=CPU, precision="bf16", dist=DistInfo(mode="deepspeed", zero_stage=2))
    policy = load_model(toy.base, runtime, dtype=torch.bfloat16)  # DeepSpeed bf16 casts the module so
    evaluate = drift_evaluator(SimpleNamespace(cfg=toy.cfg, source=toy.source, runtime=runtime), toy.tokenizer,
                               toy.base)
    assert evaluate(policy)["kl/token"] == 0.0  # the untrained policy is its reference
    assert evaluate.precision == "bf16"
    fp32 = Runtime(device=CPU, precision="bf16")  # autocast over fp32 weights: both sides fp32
    assert drift_evaluator(SimpleNamespace(cfg=toy.cfg, source=toy.source, runtime=fp32), toy.tokenizer,
                           toy.base).precision == "fp32"


@pytest.mark.slow  # a whole pipeline under bf16 autocast on the CPU (about a minute)
def test_a_pipeline_under_flash_attention_at_bf16_completes(tmp_path, model_cache):
    """Issue 20, item 1, end to end: base evaluation, SFT with `kl/token`, DPO, evaluations,
    with a flash-attention kernel (simulated) at ``precision=bf16``. Today's code trained SFT to
    its last step and then raised in `kl/token` (and a resume raised again)."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "IBRIDGE_CACHE": str(model_cache), "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "simulated_flash_cli.py"), "debug=smoke",
                           "trainer.precision=bf16", f"trainer.attn_implementation={simulated_flash.NAME}",
                           "trainer.num_threads=1", "logger=none", "sft.max_steps=4", "dpo.max_steps=4",
                           "eval.num_prompts=8", "hydra.run.dir=run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed" and results["precision"] == "bf16"
    assert results["stages"]["sft"]["kl_token_precision"] == "fp32" and results["stages"]["sft"]["kl_token"] > 0
    assert {"kl_to_ref", "implicit_reward_acc"} <= results["eval"].keys()
