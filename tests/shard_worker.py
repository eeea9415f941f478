"""Run by tests/test_sharded_work.py under torchrun (2 CPU ranks, gloo); not a test module.

The work issue 14 (item 3) took off rank 0's shoulders, each checked against one process:

1. the reference pass: each rank scores only its share, every rank gets values bitwise
   equal to one process's; rank 0's cache hit is what every rank takes (rank 1's own
   cache folder is empty: node-local caches), and the warm cache loads no model;
2. ``token_kl`` (the training-time kl/token) with whole models and with an FSDP-sharded
   policy over an odd number of batches (stand-in forwards keep the collectives paired);
3. ``evaluate_checkpoint``: each rank generates and judges only its share; every rank
   returns the metrics of one process, and rank 0 writes the same generations.jsonl and
   alpaca_eval.json byte for byte;
4. a DDP stage stopped by SIGTERM on rank 1 while rank 0's state write is slow: rank 1
   leaves only once the state is published, and resuming from it ends with the weights of
   an uninterrupted run.

Rank 0 writes what it measured to OUT/report.json.
Usage: torchrun --nproc_per_node 2 tests/shard_worker.py OUT MODEL_CACHE
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ibridge.checkpointing as checkpointing  # noqa: E402
import ibridge.evaluation.evaluate as evaluate_module  # noqa: E402
from ibridge.checkpointing import has_state  # noqa: E402
from ibridge.data import source_for  # noqa: E402
from ibridge.data.formatting import encode_split  # noqa: E402
from ibridge.distributed import DistInfo, full_tensor, shard  # noqa: E402
from ibridge.evaluation.drift import token_kl  # noqa: E402
from ibridge.evaluation.judges import GoldJudge  # noqa: E402
from ibridge.models import ensure_toy_base, load_model, load_tokenizer, save_checkpoint  # noqa: E402
from ibridge.refcache import (  # noqa: E402
    cached_reference_logps,
    sequence_token_logps,
    token_budget_batches,  # noqa: E402
)
from ibridge.runtime import Runtime  # noqa: E402
from ibridge.training import OptimSettings, StopRequested, optimise  # noqa: E402
from tests.conftest import compose_config  # noqa: E402
from tests.weighting_case import examples, parts, tiny_model  # noqa: E402

MAX_TOKENS = 160  # a small token budget: several batches, an odd number of them


def gathered(value, info: DistInfo) -> list:
    out = [None] * info.world_size
    dist.all_gather_object(out, value)
    return out


def perturbed(base, runtime: Runtime):
    """The base model moved a little (the same on every rank): a policy != its reference."""
    model = load_model(base, runtime)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model


def check_reference_pass(report, out, base, sequences, single, sharded, pad) -> None:
    info = sharded.dist
    expected = sequence_token_logps(load_model(base, single, for_inference=True), sequences, single, pad,
                                    max_tokens=MAX_TOKENS)
    scored = {"rows": 0, "loads": 0}

    def counting_load():
        scored["loads"] += 1
        model = load_model(base, sharded, for_inference=True)
        model.register_forward_pre_hook(lambda module, args, kwargs: scored.__setitem__(
            "rows", scored["rows"] + kwargs["input_ids"].shape[0]), with_kwargs=True)
        return model

    cache = out / f"cache-rank{info.rank}"  # one folder per rank, as on nodes with local disks
    got = cached_reference_logps(base, sequences, sharded, pad, cache, load_reference=counting_load,
                                 max_tokens=MAX_TOKENS)
    assert len(got) == len(expected)
    worst = max(float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(got, expected, strict=True))
    bitwise = all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))

    def must_not_load():
        raise AssertionError(f"rank {info.rank}: the reference was loaded although rank 0's cache is warm")

    again = cached_reference_logps(base, sequences, sharded, pad, cache, load_reference=must_not_load,
                                   max_tokens=MAX_TOKENS)
    hit_equal = all(torch.equal(a, b) for a, b in zip(again, expected, strict=True))
    per_rank = gathered({"rows": scored["rows"], "loads": scored["loads"], "bitwise": bitwise, "worst": worst,
                         "hit_equal": hit_equal, "files": len(list(cache.glob("reflogps/*.safetensors")))}, info)
    report["reference_pass"] = {"sequences": len(sequences), "ranks": per_rank}


def check_token_kl(report, base, heldout, single, info, pad) -> None:
    policy, reference = perturbed(base, single), load_model(base, single)
    expected = token_kl(policy, reference, heldout, single, pad, max_tokens=MAX_TOKENS)
    whole = token_kl(policy, reference, heldout, single, pad, max_tokens=MAX_TOKENS, shard=info)
    fsdp_info = dataclasses.replace(info, mode="fsdp")
    sharded_policy = shard(perturbed(base, single), fsdp_info, torch.device("cpu"), "fp32")
    forwards = []
    sharded_policy.register_forward_pre_hook(lambda module, args: forwards.append(1))
    fsdp = token_kl(sharded_policy, reference, heldout, single, pad, max_tokens=MAX_TOKENS, shard=fsdp_info)
    report["token_kl"] = {"single": expected, "batches": len(token_budget_batches([len(seq["input_ids"]) for seq in heldout], MAX_TOKENS)),
                          "ranks": gathered({"whole": whole, "fsdp": fsdp, "fsdp_forwards": len(forwards)}, info)}


def check_evaluation(report, out, cfg, source, base, single, sharded, tokenizer) -> None:
    info = sharded.dist
    if info.is_main:
        save_checkpoint(perturbed(base, single), tokenizer, out / "policy")
    dist.barrier()
    counts = {"generated": 0, "judged": 0}
    original_load, original_score = evaluate_module.load_model, GoldJudge.score

    def counting_load(*args, **kwargs):
        model = original_load(*args, **kwargs)
        generate = model.generate

        def counted(*g_args, **g_kwargs):
            counts["generated"] += g_kwargs["input_ids"].shape[0]
            return generate(*g_args, **g_kwargs)

        model.generate = counted
        return model

    def counting_score(self, prompts, responses):
        counts["judged"] += len(responses)
        return original_score(self, prompts, responses)

    evaluate_module.load_model, GoldJudge.score = counting_load, counting_score
    try:
        metrics = evaluate_module.evaluate_checkpoint(cfg, source, out / "policy", base, sharded,
                                                      out / "eval-sharded", "policy")
        per_rank = gathered({"metrics": metrics, **counts}, info)
        if info.is_main:  # one process alone, the other rank waiting
            counts.update(generated=0, judged=0)
            alone = evaluate_module.evaluate_checkpoint(cfg, source, out / "policy", base, single,
                                                        out / "eval-single", "policy")
            files = {name: (out / "eval-sharded" / name).read_bytes() == (out / "eval-single" / name).read_bytes()
                     for name in ("generations.jsonl", "alpaca_eval.json")}
            report["evaluation"] = {"single": alone, "single_counts": dict(counts), "ranks": per_rank,
                                    "files_equal": files, "prompts": int(cfg.eval.num_prompts)}
        dist.barrier()
    finally:
        evaluate_module.load_model, GoldJudge.score = original_load, original_score


def check_resume(report, out, single, info) -> None:
    ddp = dataclasses.replace(single, dist=info)
    _, compute, collate, count = parts("sft")
    settings = OptimSettings(lr=1e-2, max_steps=4, batch_size=1, grad_accum=1, max_grad_norm=1e9, log_every=2,
                             pack_sequences=False)
    items = examples("sft")
    straight = tiny_model()
    optimise(straight, items, collate, compute, settings, ddp, count_units=count)

    state_dir = out / "state"
    calls = {"n": 0}

    def sigterm_on_rank1(batch):  # counted on every rank before the step's collective
        calls["n"] += 1
        if info.rank == 1 and calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the loop: every rank saves step 2's state and stops
        return count(batch)

    original_save_file = checkpointing.save_file

    def slow_save_file(*args, **kwargs):  # a big state on a slow disk
        time.sleep(3.0)
        return original_save_file(*args, **kwargs)

    checkpointing.save_file = slow_save_file if info.is_main else original_save_file
    stopped_at, published = None, None
    try:
        optimise(tiny_model(), items, collate, compute, settings, ddp, state_dir=state_dir,
                 count_units=sigterm_on_rank1)
    except StopRequested:
        published = has_state(state_dir)  # checked the moment this rank leaves the loop
        stopped_at = json.loads((state_dir / "trainer_state.json").read_text())["step"] if published else None
    finally:
        checkpointing.save_file = original_save_file
    dist.barrier()
    resumed = tiny_model()
    summary = optimise(resumed, items, collate, compute, settings, ddp, state_dir=state_dir, count_units=count)
    worst = max(float((full_tensor(a) - full_tensor(b)).detach().abs().max())
                for a, b in zip(straight.parameters(), resumed.parameters(), strict=True))
    report["resume"] = {"ranks": gathered({"published_on_exit": published, "stopped_at": stopped_at,
                                           "resumed_from": summary.resumed_from, "worst": worst}, info)}


def main(out: Path, cache: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=180))  # a hang fails fast
    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), mode="ddp")
    cfg = compose_config(["debug=smoke", f"model.cache_dir={cache}", "eval.num_prompts=12", "eval.batch_size=4",
                          "eval.max_new_tokens=8", "eval.bootstrap_resamples=50"])
    single = Runtime(device=torch.device("cpu"), precision="fp32", attn_implementation="eager")
    sharded = dataclasses.replace(single, dist=info)
    source = source_for(cfg.data)
    base = ensure_toy_base(cfg.model, source.world_config, single)  # built by the test beforehand
    tokenizer = load_tokenizer(base)
    pad = tokenizer.pad_token_id
    sequences, _ = encode_split(tokenizer, source.examples("demonstrations")[:45], "demonstrations",
                                int(cfg.model.max_length))
    report: dict = {}
    check_reference_pass(report, out, base, sequences, single, sharded, pad)
    check_token_kl(report, base, sequences[:33], single, info, pad)  # 3 batches: one a stand-in
    check_evaluation(report, out, cfg, source, base, single, sharded, tokenizer)
    check_resume(report, out, single, info)
    if info.is_main:
        (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    dist.barrier()
    dist.destroy_process_group()
    # This process wrapped four models in DDP; under load, their C++ reducers were once torn
    # down after the process group at interpreter exit ("terminate called without an active
    # exception", after every check had passed and the report was written). Leave without
    # running those destructors: the work and its report are complete here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
