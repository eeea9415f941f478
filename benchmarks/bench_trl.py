"""ibridge against TRL and a bare PyTorch loop, on the same toy model, data and settings.

    python benchmarks/bench_trl.py [--repeats 3] [--sft-steps N] [--dpo-steps N] [overrides ...]

Needs the `bench` extra (TRL); the ibridge package itself never imports TRL.

Runs, each configuration in a fresh subprocess (so peak memory is its own),
interleaved and repeated `--repeats` times (the machine is shared: the targets use
the best run of each configuration, the fastest being the least disturbed; medians
are printed beside them):

* DPO: TRL's DPOTrainer with its default on-the-fly reference model, TRL with
  ``precompute_ref_log_probs=True``, ibridge's DPO stage (cold reference cache: the
  reference pass is done and timed), and a bare loop;
* SFT: TRL's SFTTrainer, ibridge's sft stage, and a bare loop.

Same base model (the toy Llama), tokenizer, examples (the exact token sequences
are checked to be identical), sequence lengths, batch size, number of steps, lr,
cosine schedule with warmup, gradient clipping, fp32 everywhere, eager attention
everywhere (on CPU transformers' sdpa path is far slower; TRL's models are loaded
with attn_implementation="eager" too), gradient checkpointing off, no evaluation,
no checkpoints, TRL logging once per run. Each tool samples its own batches from
the same data (TRL: random sampler; ibridge: its own batch order); the bare loop
runs exactly ibridge's batches, pre-collated, with plain PyTorch: forward, loss,
backward, AdamW step, nothing else.

Reported per configuration: tokens (non-pad, chosen + rejected for DPO) per second
over the whole stage (tokenisation, reference pass, model loading, training) and
over the optimisation steps alone (forward, backward, clipping, optimiser step:
for TRL the span between its on_step_begin and on_step_end callbacks, for ibridge
the loop minus batch collation, for the bare loop its loop), peak resident memory
of the process (ru_maxrss) and its growth during the stage, and the ratios.

Also, in the same run: the correctness check (ibridge's DPO loss and reward
metrics against TRL's on identical batches, to 1e-5; the SFT loss too), what TRL
does with its own defaults on this machine (bf16 autocast, gradient checkpointing,
sdpa attention; a few steps only), every f-divergence objective's step against an
sft step (benchmarks/bench_objectives.py), and generation speed of the eval job
against plain `model.generate`, plus the default world's whole eval time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

DPO_CONFIGS = ["trl_dpo", "trl_dpo_precompute", "ibridge_dpo", "bare_dpo"]
SFT_CONFIGS = ["trl_sft", "ibridge_sft", "bare_sft"]
LABELS = {
    "trl_dpo": "TRL DPOTrainer (reference on the fly)",
    "trl_dpo_precompute": "TRL DPOTrainer (precompute_ref_log_probs)",
    "ibridge_dpo": "ibridge dpo stage (cold reference cache)",
    "bare_dpo": "bare PyTorch loop (DPO, same batches)",
    "trl_sft": "TRL SFTTrainer",
    "ibridge_sft": "ibridge sft stage",
    "bare_sft": "bare PyTorch loop (SFT, same batches)",
}


# --------------------------------------------------------------------------- helpers


def rss_mb() -> float:
    """Current resident memory of this process (MiB)."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def compose_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from ibridge.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides) + ["logger=none"])


def user(text):
    return [{"role": "user", "content": text}] if isinstance(text, str) else list(text)


def assistant(text):
    return [{"role": "assistant", "content": text}]


class Spec(dict):
    __getattr__ = dict.__getitem__


# --------------------------------------------------------------------------- workers
# Each worker runs in its own process and prints one JSON line "RESULT {...}".


def _runtime(spec):
    import torch

    from ibridge.runtime import resolve_runtime

    cfg = compose_cfg(spec.overrides)
    runtime = resolve_runtime(cfg.trainer)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    return cfg, runtime


def _settings(spec, kind: str):
    from ibridge.training import OptimSettings

    s = spec.sft if kind == "sft" else spec.dpo
    return OptimSettings(lr=s["lr"], max_steps=s["steps"], batch_size=s["batch_size"],
                         weight_decay=s["weight_decay"], max_grad_norm=s["max_grad_norm"],
                         log_every=s["log_every"], warmup_ratio=spec.warmup_ratio, schedule=spec.schedule,
                         seed=spec.seed)


def worker_ibridge(spec, kind: str) -> dict:
    """ibridge's stage as `train_stage` wires it, minus checkpoint writing and the drift evaluation."""
    import torch

    cfg, runtime = _runtime(spec)
    from types import SimpleNamespace

    from omegaconf import open_dict

    from ibridge.data.collate import collate_demonstrations, collate_pairs
    from ibridge.data.formatting import encode_split
    from ibridge.models import load_model, load_tokenizer
    from ibridge.objectives import build_objective
    from ibridge.stages import attach_reference, demonstration_step, preference_step
    from ibridge.training import optimise

    data_kind = "demonstrations" if kind == "sft" else "preferences"
    examples = json.loads(Path(spec.data).read_text())[data_kind]
    cache = tempfile.mkdtemp(prefix="bench-refcache-")  # cold reference cache: the pass is timed
    with open_dict(cfg):
        cfg.model.cache_dir = cache
    ctx = SimpleNamespace(cfg=cfg, runtime=runtime)
    settings = _settings(spec, kind)
    objective = build_objective({"name": "sft"} if kind == "sft" else {"name": "dpo", "beta": spec.dpo["beta"]})
    collated = {"s": 0.0}

    rss0 = rss_mb()
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(spec.base)
    pad = tokenizer.pad_token_id
    encoded, _ = encode_split(tokenizer, examples, data_kind, spec.max_length)
    t_ref = time.perf_counter()
    if objective.needs_reference:
        attach_reference(encoded, data_kind, Path(spec.base), ctx, pad)
    t_ref = time.perf_counter() - t_ref
    model = load_model(spec.base, runtime)
    base_collate = collate_demonstrations if kind == "sft" else collate_pairs

    def collate(items):
        start = time.perf_counter()
        batch = base_collate(items, pad)
        collated["s"] += time.perf_counter() - start
        return batch

    step = demonstration_step(objective) if kind == "sft" else preference_step(objective)
    t_loop = time.perf_counter()
    summary = optimise(model, encoded, collate, step, settings, runtime, desc=f"ibridge {kind}")
    t1 = time.perf_counter()
    del model
    return {"tokens": summary.tokens, "steps": summary.steps, "stage_s": t1 - t0,
            "steps_s": (t1 - t_loop) - collated["s"], "collate_s": collated["s"], "ref_s": t_ref,
            "prep_s": t_loop - t0, "rss_start_mb": rss0, "final_loss": summary.final_metrics.get("train/loss"),
            "threads": torch.get_num_threads()}


def bare_batches(spec, kind: str, runtime):
    """ibridge's own batches for this stage, collated in advance (with reference log-probs for DPO)."""
    from types import SimpleNamespace

    from omegaconf import open_dict

    from ibridge.batching import optimiser_steps
    from ibridge.data.collate import collate_demonstrations, collate_pairs
    from ibridge.data.formatting import encode_split
    from ibridge.models import load_tokenizer
    from ibridge.stages import attach_reference

    data_kind = "demonstrations" if kind == "sft" else "preferences"
    examples = json.loads(Path(spec.data).read_text())[data_kind]
    tokenizer = load_tokenizer(spec.base)
    pad = tokenizer.pad_token_id
    encoded, _ = encode_split(tokenizer, examples, data_kind, spec.max_length)
    if kind == "dpo":
        cfg = compose_cfg(spec.overrides)
        with open_dict(cfg):
            cfg.model.cache_dir = tempfile.mkdtemp(prefix="bench-refcache-")
        attach_reference(encoded, data_kind, Path(spec.base), SimpleNamespace(cfg=cfg, runtime=runtime), pad)
    settings = _settings(spec, kind)
    collate = collate_demonstrations if kind == "sft" else collate_pairs
    stream = optimiser_steps(len(encoded), settings.batch_size, settings.grad_accum, settings.seed)
    steps = [next(stream)[1] for _ in range(settings.total_steps(len(encoded)))]
    return [collate([encoded[i] for i in micro.indices], pad) for plan in steps for micro in plan]


def worker_bare(spec, kind: str) -> dict:
    """The practical ceiling: forward, loss, backward, AdamW step over ibridge's batches; nothing else."""
    import torch
    import torch.nn.functional as F

    cfg, runtime = _runtime(spec)
    from ibridge.models import load_model

    batches = bare_batches(spec, kind, runtime)
    model = load_model(spec.base, runtime)
    model.train()
    lr = spec.sft["lr"] if kind == "sft" else spec.dpo["lr"]
    beta = spec.dpo["beta"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rss0 = rss_mb()
    tokens = 0
    t0 = time.perf_counter()
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        if kind == "sft":
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1))
        else:
            mask = targets != -100
            logps = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            chosen, rejected = (logps * mask).sum(-1).chunk(2)
            margin = (chosen - batch["ref_chosen"]) - (rejected - batch["ref_rejected"])
            loss = -F.logsigmoid(beta * margin).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    t1 = time.perf_counter()
    return {"tokens": tokens, "steps": len(batches), "stage_s": None, "steps_s": t1 - t0, "rss_start_mb": rss0,
            "final_loss": float(loss), "threads": torch.get_num_threads()}


def _trl_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Time between on_step_begin and on_step_end: forward(s), backward, clipping, optimiser step."""

        def __init__(self):
            self.total = 0.0
            self.steps = 0
            self._start = None
            self.train_begin = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.train_begin = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.total += time.perf_counter() - self._start
            self.steps += 1

    return StepTimer()


def _trl_args(config_cls, spec, kind: str, out: str, defaults: bool = False, **extra):
    s = spec.sft if kind == "sft" else spec.dpo
    common = dict(output_dir=out, per_device_train_batch_size=s["batch_size"], max_steps=s["steps"],
                  report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True, seed=spec.seed,
                  max_length=spec.max_length)
    if defaults:  # TRL's own defaults for precision, checkpointing, lr, schedule; logging as usual
        # use_cpu=True is needed on a CPU-only machine: without it TRL's default bf16=True refuses to start
        # ("Your setup doesn't support bf16/gpu").
        return config_cls(**common, use_cpu=True, **extra)
    return config_cls(
        **common,
        learning_rate=s["lr"],
        lr_scheduler_type=spec.schedule,
        warmup_steps=int(spec.warmup_ratio * s["steps"]),  # ibridge: int(warmup_ratio * total)
        weight_decay=s["weight_decay"],
        max_grad_norm=s["max_grad_norm"],
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        logging_steps=s["steps"],
        **extra,
    )


def trl_datasets(spec):
    """The same examples in TRL's conversational formats (prompt/completion, prompt/chosen/rejected)."""
    from datasets import Dataset

    data = json.loads(Path(spec.data).read_text())
    sft = Dataset.from_list([{"prompt": user(e["prompt"]), "completion": assistant(e["response"])}
                             for e in data["demonstrations"]])
    dpo = Dataset.from_list([{"prompt": user(e["prompt"]), "chosen": assistant(e["chosen"]),
                              "rejected": assistant(e["rejected"])} for e in data["preferences"]])
    return sft, dpo


def worker_trl(spec, kind: str, precompute: bool = False, defaults: bool = False) -> dict:
    import torch

    _runtime(spec)  # threads
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    sft_data, dpo_data = trl_datasets(spec)
    out = tempfile.mkdtemp(prefix="bench-trl-")
    timer = _trl_timer()
    rss0 = rss_mb()
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec.base)
    if defaults:
        model = spec.base  # TRL loads it itself: its default dtype and attention implementation
    else:
        model = AutoModelForCausalLM.from_pretrained(spec.base, dtype=torch.float32, attn_implementation="eager")
    if kind == "sft":
        args = _trl_args(SFTConfig, spec, "sft", out, defaults)
        trainer = SFTTrainer(model=model, args=args, train_dataset=sft_data, processing_class=tokenizer,
                             callbacks=[timer])
    else:
        args = _trl_args(DPOConfig, spec, "dpo", out, defaults, beta=spec.dpo["beta"],
                         precompute_ref_log_probs=precompute)
        trainer = DPOTrainer(model=model, args=args, train_dataset=dpo_data, processing_class=tokenizer,
                             callbacks=[timer])
    t_loop = time.perf_counter()
    result = trainer.train()
    t1 = time.perf_counter()
    settings = {"bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing,
                "attn_implementation": trainer.model.config._attn_implementation,
                "dtype": str(trainer.model.dtype), "learning_rate": args.learning_rate,
                "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", str(args.lr_scheduler_type)),
                "optim": getattr(args.optim, "value", str(args.optim))}
    # TRL counts attention_mask.sum() per training batch (chosen + rejected for DPO), as ibridge does.
    tokens = getattr(trainer, "_total_train_tokens", None) or trainer.state.num_input_tokens_seen
    return {"tokens": int(tokens), "steps": timer.steps, "stage_s": t1 - t0,
            "steps_s": timer.total, "prep_s": t_loop - t0, "rss_start_mb": rss0,
            "final_loss": float(result.training_loss), "threads": torch.get_num_threads(), "settings": settings}


def worker_check(spec) -> dict:
    """Identical sequences, and ibridge's DPO (and SFT) loss and metrics against TRL's on identical batches."""
    import torch

    cfg, runtime = _runtime(spec)
    from types import SimpleNamespace

    from omegaconf import open_dict
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from ibridge.data.collate import collate_demonstrations, collate_pairs
    from ibridge.data.formatting import encode_split
    from ibridge.models import load_model, load_tokenizer
    from ibridge.objectives import build_objective
    from ibridge.stages import attach_reference, demonstration_step, preference_step
    from ibridge.training import OptimSettings, optimise

    data = json.loads(Path(spec.data).read_text())
    tokenizer = load_tokenizer(spec.base)
    pad = tokenizer.pad_token_id
    sft_enc, _ = encode_split(tokenizer, data["demonstrations"], "demonstrations", spec.max_length)
    dpo_enc, _ = encode_split(tokenizer, data["preferences"], "preferences", spec.max_length)
    with open_dict(cfg):
        cfg.model.cache_dir = tempfile.mkdtemp(prefix="bench-refcache-")
    ctx = SimpleNamespace(cfg=cfg, runtime=runtime)
    attach_reference(dpo_enc, "preferences", Path(spec.base), ctx, pad)
    beta = spec.dpo["beta"]
    dpo = build_objective({"name": "dpo", "beta": beta})

    # A policy that differs from the reference (a few DPO steps), so rewards are not all zero.
    policy_dir = Path(tempfile.mkdtemp(prefix="bench-policy-"))
    policy = load_model(spec.base, runtime)
    optimise(policy, dpo_enc, lambda items: collate_pairs(items, pad), preference_step(dpo),
             OptimSettings(lr=spec.dpo["lr"], max_steps=20, batch_size=spec.dpo["batch_size"], log_every=10**9),
             runtime, desc="check: perturb policy")
    policy.save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)

    out = tempfile.mkdtemp(prefix="bench-trl-")
    sft_data, dpo_data = trl_datasets(spec)
    eager = dict(dtype=torch.float32, attn_implementation="eager")
    from transformers import AutoModelForCausalLM

    trl_dpo = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_dir, **eager),
        ref_model=AutoModelForCausalLM.from_pretrained(spec.base, **eager),
        args=_trl_args(DPOConfig, spec, "dpo", out, beta=beta), train_dataset=dpo_data, processing_class=tokenizer)
    trl_sft = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(policy_dir, **eager),
                         args=_trl_args(SFTConfig, spec, "sft", out), train_dataset=sft_data,
                         processing_class=tokenizer)

    # 1. The tokenised sequences are identical.
    mismatched = 0
    trl_tokens = ours_tokens = 0
    for row, ours in zip(trl_dpo.train_dataset, dpo_enc, strict=True):
        for side in ("chosen", "rejected"):
            ids = row["prompt_ids"] + row[f"{side}_ids"]
            labels = [-100] * len(row["prompt_ids"]) + row[f"{side}_ids"]
            trl_tokens += len(ids)
            ours_tokens += len(ours[side]["input_ids"])
            mismatched += ids != ours[side]["input_ids"] or labels != ours[side]["labels"]
    sft_mismatched = 0
    sft_trl_tokens = sft_ours_tokens = 0
    for row, ours in zip(trl_sft.train_dataset, sft_enc, strict=True):
        sft_trl_tokens += len(row["input_ids"])
        sft_ours_tokens += len(ours["input_ids"])
        sft_mismatched += row["input_ids"] != ours["input_ids"] or row["labels"] != ours["labels"]

    # 2. Loss and metrics on identical batches (policy in train mode; dropout is 0 in the toy model).
    ours_policy = load_model(policy_dir, runtime)
    ours_policy.train()
    # ibridge's training loop runs the model through PackedForward (padding-free packing) where supported:
    # check that path as well as the plain padded forward.
    from ibridge.packing import PackedForward, packing_supported

    forwards = [ours_policy] + ([PackedForward(ours_policy)] if packing_supported(ours_policy, runtime) else [])
    trl_dpo.model.train()
    trl_sft.model.train()
    sft_step = demonstration_step(build_objective({"name": "sft"}))
    dpo_step = preference_step(dpo)
    keys = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]
    worst = {key: 0.0 for key in ["loss", *keys, "sft_loss"]}
    n = spec.dpo["batch_size"]
    batches = 0
    values = {}
    for start in range(0, min(len(dpo_enc), 8 * n), n):
        idx = list(range(start, min(start + n, len(dpo_enc))))
        with torch.no_grad():
            trl_dpo._metrics["train"].clear()
            trl_batch = trl_dpo.data_collator([trl_dpo.train_dataset[i] for i in idx])
            trl_loss = trl_dpo.compute_loss(trl_dpo.model, trl_batch)
            theirs = {key: trl_dpo._metrics["train"][key][-1] for key in keys}
            sft_batch = trl_sft.data_collator([trl_sft.train_dataset[i] for i in idx])
            sft_theirs = trl_sft.compute_loss(trl_sft.model, sft_batch)
            for forward in forwards:
                ours = dpo_step(forward, collate_pairs([dpo_enc[i] for i in idx], pad))
                worst["loss"] = max(worst["loss"], abs(float(ours.loss) - float(trl_loss)))
                for key in keys:
                    worst[key] = max(worst[key], abs(float(ours.metrics[key]) - theirs[key]))
                values = {"loss": (float(ours.loss), float(trl_loss)),
                          **{key: (float(ours.metrics[key]), theirs[key]) for key in keys}}
                sft_ours = sft_step(forward, collate_demonstrations([sft_enc[i] for i in idx], pad))
                worst["sft_loss"] = max(worst["sft_loss"], abs(float(sft_ours.loss) - float(sft_theirs)))
        batches += 1
    return {"dpo_sequences_mismatched": int(mismatched), "dpo_tokens": [ours_tokens, trl_tokens],
            "sft_sequences_mismatched": int(sft_mismatched), "sft_tokens": [sft_ours_tokens, sft_trl_tokens],
            "batches": batches, "forwards": len(forwards), "max_abs_diff": worst, "last_batch": values}


def worker_generation(spec) -> dict:
    """Eval-job generation (ibridge.evaluation.generate) against plain model.generate, same prompts; whole eval."""
    import torch

    cfg, runtime = _runtime(spec)
    from ibridge.data import source_for
    from ibridge.data.formatting import prompt_ids
    from ibridge.evaluation.evaluate import evaluate_checkpoint
    from ibridge.evaluation.generate import generate
    from ibridge.models import load_model, load_tokenizer

    source = source_for(cfg.data)
    tokenizer = load_tokenizer(spec.base)
    model = load_model(spec.base, runtime)
    ev = cfg.eval
    examples = source.examples("eval")
    if ev.num_prompts > 0:
        examples = examples[: ev.num_prompts]
    prompts = [e["prompt"] for e in examples]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def count(rows):
        total = 0
        for tokens in rows:
            total += tokens.index(eos) + 1 if eos in tokens else sum(t != pad for t in tokens)
        return total

    def plain():
        # The prompts as given, left-padded, in order, `eval.batch_size` at a time: one model.generate each.
        encoded = [prompt_ids(tokenizer, p) for p in prompts]
        rows = []
        with torch.no_grad():
            for start in range(0, len(encoded), ev.batch_size):
                chunk = encoded[start : start + ev.batch_size]
                width = max(map(len, chunk))
                ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk])
                mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(c) for c in chunk])[:, None]).long()
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=ev.max_new_tokens,
                                     do_sample=False, pad_token_id=pad, eos_token_id=eos)
                rows += out[:, width:].tolist()
        return count(rows)

    def ours():
        rows = generate(model, tokenizer, prompts, runtime, ev.max_new_tokens, ev.batch_size, desc="generate")
        return count([r["response_ids"] for r in rows])

    timings = {"plain": [], "ibridge": []}
    tokens = {}
    for _ in range(spec.gen_repeats):
        for name, fn in (("plain", plain), ("ibridge", ours)):
            start = time.perf_counter()
            tokens[name] = fn()
            timings[name].append(time.perf_counter() - start)
    out_dir = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    start = time.perf_counter()
    metrics = evaluate_checkpoint(cfg, source, Path(spec.base), Path(spec.base), runtime, out_dir, generator="base")
    eval_s = time.perf_counter() - start
    return {"prompts": len(prompts), "max_new_tokens": int(ev.max_new_tokens), "batch_size": int(ev.batch_size),
            "tokens": tokens, "times": timings, "eval_s": eval_s,
            "eval_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}


# Each subprocess worker by name: what it runs, given the spec.
WORKERS = {
    "ibridge_sft": (lambda spec: worker_ibridge(spec, "sft")),
    "ibridge_dpo": (lambda spec: worker_ibridge(spec, "dpo")),
    "bare_sft": (lambda spec: worker_bare(spec, "sft")),
    "bare_dpo": (lambda spec: worker_bare(spec, "dpo")),
    "trl_sft": (lambda spec: worker_trl(spec, "sft")),
    "trl_dpo": (lambda spec: worker_trl(spec, "dpo")),
    "trl_dpo_precompute": (lambda spec: worker_trl(spec, "dpo", precompute=True)),
    "trl_sft_defaults": (lambda spec: worker_trl(spec, "sft", defaults=True)),
    "trl_dpo_defaults": (lambda spec: worker_trl(spec, "dpo", defaults=True)),
    "check": worker_check,
    "generation": worker_generation,
}


def run_worker(name: str, spec: Spec) -> dict:
    if name not in WORKERS:
        raise SystemExit(f"unknown worker {name}")
    result = WORKERS[name](spec)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


# --------------------------------------------------------------------------- driver


def spawn(name: str, spec_file: Path, timeout: float = 900) -> dict:
    threads = json.loads(spec_file.read_text()).get("threads", 0)
    pinned = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}
    env = dict(os.environ, **pinned, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=tempfile.mkdtemp(prefix="bench-hfds-"),
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec", str(spec_file)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    raise RuntimeError(f"worker {name} failed (exit {proc.returncode}):\n{tail}")


def fmt_rate(x):
    return "-" if x is None else f"{x / 1000:7.2f}k"


def rates(run: dict) -> tuple[float | None, float]:
    whole = run["tokens"] / run["stage_s"] if run.get("stage_s") else None
    return whole, run["tokens"] / run["steps_s"]


def summarise(runs: list[dict]) -> dict:
    whole = [r for r in (rates(run)[0] for run in runs) if r is not None]
    steps = [rates(run)[1] for run in runs]
    return {
        "whole_median": statistics.median(whole) if whole else None,
        "whole_best": max(whole) if whole else None,
        "steps_median": statistics.median(steps),
        "steps_best": max(steps),
        "peak_mb": statistics.median(run["peak_rss_mb"] for run in runs),
        "growth_mb": statistics.median(run["peak_rss_mb"] - run["rss_start_mb"] for run in runs),
        "tokens": runs[0]["tokens"],
        "steps": runs[0]["steps"],
        "stage_s": statistics.median(run["stage_s"] for run in runs) if runs[0].get("stage_s") else None,
        "ref_s": statistics.median(run["ref_s"] for run in runs) if runs[0].get("ref_s") else None,
        "prep_s": statistics.median(run["prep_s"] for run in runs) if runs[0].get("prep_s") else None,
        "steps_s": statistics.median(run["steps_s"] for run in runs),
    }


def print_table(title: str, names: list[str], stats: dict) -> None:
    print(f"\n{title}")
    print(f"  {'configuration':<44} {'tokens':>7} {'whole stage tok/s':>19} {'steps only tok/s':>18} "
          f"{'peak RSS':>9} {'growth':>7}")
    print(f"  {'':<44} {'':>7} {'median    best':>19} {'median    best':>18} {'MiB':>9} {'MiB':>7}")
    for name in names:
        s = stats[name]
        print(f"  {LABELS[name]:<44} {s['tokens']:>7} {fmt_rate(s['whole_median'])} {fmt_rate(s['whole_best'])}"
              f"  {fmt_rate(s['steps_median'])} {fmt_rate(s['steps_best'])} {s['peak_mb']:>9.0f} "
              f"{s['growth_mb']:>7.0f}")


def print_breakdown(names: list[str], stats: dict) -> None:
    """Where a stage's time goes (medians, seconds)."""
    print(f"  where the time goes (median s): {'stage':>6} = {'before loop':>11} + {'steps':>6} + {'rest of loop':>12}"
          "   (before loop: tokenisation, reference pass, model/trainer setup; rest: collation, data loading, "
          "logging, callbacks)")
    for name in names:
        s = stats[name]
        if s["stage_s"] is None:
            continue
        rest = s["stage_s"] - s["prep_s"] - s["steps_s"]
        ref = f"   (reference pass {s['ref_s']:.2f} s)" if s["ref_s"] else ""
        print(f"    {LABELS[name]:<44} {s['stage_s']:6.2f} = {s['prep_s']:11.2f} + {s['steps_s']:6.2f} + "
              f"{rest:12.2f}{ref}")


def ratio_line(label: str, value: float, target: float, op: str = ">=", median: float | None = None):
    ok = value >= target if op == ">=" else value <= target
    extra = f" [{median:5.2f}x]" if median is not None else " " * 9
    return f"  {label:<58} {value:6.2f}x{extra}  (target {op} {target:.2f}x)  {'ok' if ok else 'MISSED'}", ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of every configuration (median)")
    parser.add_argument("--sft-steps", type=int, default=0, help="optimisation steps of the SFT runs (0: the stage's)")
    parser.add_argument("--dpo-steps", type=int, default=0, help="optimisation steps of the DPO runs (0: the stage's)")
    parser.add_argument("--default-steps", type=int, default=4, help="steps of the TRL-defaults runs (0: skip)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in every run (0: torch's default). 1 by default: on a shared 2-core "
                        "machine a two-thread run slows down many times over whenever another process runs")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: "
                        "dpo,sft,check,defaults,objectives,generation")
    parser.add_argument("--objective-steps", type=int, default=60)  # 30 steps (~0.7 s) proved too noisy
    parser.add_argument("--json", type=Path, default=None, help="also write every raw result here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. debug=smoke")
    args = parser.parse_args()

    if args.worker:
        spec = Spec(json.loads(args.spec.read_text()))
        result = run_worker(args.worker, spec)
        print("RESULT " + json.dumps(result))
        return

    try:
        import trl  # noqa: F401  (benchmark-only dependency)
    except ImportError:
        raise SystemExit("bench_trl.py needs TRL: pip install -e '.[bench]'") from None
    import torch
    import transformers

    from ibridge.data import source_for
    from ibridge.models import ensure_toy_base
    from ibridge.runtime import resolve_runtime

    skip = set(filter(None, args.skip.split(",")))
    wall = time.perf_counter()
    cfg = compose_cfg(args.overrides)
    runtime = resolve_runtime(cfg.trainer)
    if runtime.device.type != "cpu" or runtime.precision != "fp32":
        print(f"note: ibridge resolved device={runtime.device}, precision={runtime.precision}; "
              "this benchmark is written for the fp32 CPU comparison")
    source = source_for(cfg.data)
    base = ensure_toy_base(cfg.model, source.world_config, runtime)
    work = Path(tempfile.mkdtemp(prefix="bench-trl-"))
    keep = {"demonstrations": ("prompt", "response"), "preferences": ("prompt", "chosen", "rejected")}
    data = {kind: [{k: e[k] for k in fields} for e in source.examples(kind)] for kind, fields in keep.items()}
    (work / "data.json").write_text(json.dumps(data))

    def steps_of(opt_cfg, override: int, n: int) -> int:
        if override > 0:
            return override
        if int(opt_cfg.max_steps) > 0:
            return int(opt_cfg.max_steps)
        return int(opt_cfg.epochs) * math.ceil(n / (int(opt_cfg.batch_size) * int(opt_cfg.grad_accum)))

    def opt(opt_cfg, lr, steps, **extra):
        return {"lr": float(lr), "steps": steps, "batch_size": int(opt_cfg.batch_size),
                "weight_decay": float(opt_cfg.weight_decay), "max_grad_norm": float(opt_cfg.max_grad_norm),
                "log_every": int(opt_cfg.log_every), **extra}

    sft_steps = steps_of(cfg.sft, args.sft_steps, len(data["demonstrations"]))
    dpo_steps = steps_of(cfg.dpo, args.dpo_steps, len(data["preferences"]))
    spec = Spec(base=str(base), data=str(work / "data.json"), overrides=list(args.overrides),
                max_length=int(cfg.model.max_length), seed=int(cfg.seed), threads=args.threads,
                warmup_ratio=float(cfg.schedule.warmup_ratio), schedule=str(cfg.schedule.name),
                sft=opt(cfg.sft, cfg.lr, sft_steps), gen_repeats=5,
                dpo=opt(cfg.dpo, cfg.dpo.lr, dpo_steps, beta=float(cfg.dpo.objective.get("beta", 0.1))))
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps(spec))

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"ibridge vs TRL {trl.__version__} | torch {torch.__version__}, transformers {transformers.__version__} | "
          f"{os.cpu_count()} CPUs ({cpu}), torch threads {args.threads or torch.get_num_threads()}")
    print(f"toy base {base.name}: {json.loads((base / 'ibridge_base.json').read_text())['parameters']:,} "
          f"parameters; {len(data['demonstrations'])} demonstrations, {len(data['preferences'])} preference pairs, "
          f"max_length {spec.max_length}")
    print(f"settings (all tools): fp32 (no autocast), eager attention, gradient checkpointing off, "
          f"batch {spec.sft['batch_size']} (SFT) / {spec.dpo['batch_size']} pairs (DPO), "
          f"SFT {sft_steps} steps lr {spec.sft['lr']:g}, DPO {dpo_steps} steps lr {spec.dpo['lr']:g} "
          f"beta {spec.dpo['beta']:g}, {spec.schedule} schedule, warmup {spec.warmup_ratio:g}, "
          f"max_grad_norm {spec.sft['max_grad_norm']:g}, no eval, no checkpoints")
    print(f"each configuration in its own process, {args.repeats} interleaved repeats; targets from the best run "
          f"of each, medians beside", flush=True)

    configs = ([] if "dpo" in skip else DPO_CONFIGS) + ([] if "sft" in skip else SFT_CONFIGS)
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for rep in range(args.repeats if configs else 0):
        for name in configs:
            runs[name].append(spawn(name, spec_file))
        print(f"  repeat {rep + 1}/{args.repeats} done ({time.perf_counter() - wall:.0f} s)", flush=True)
    stats = {name: summarise(r) for name, r in runs.items() if r}
    raw: dict = {"spec": spec, "runs": runs}

    lines, all_ok = [], True

    def compare(label: str, ours: dict, other: dict, key: str, target: float) -> bool:
        """Throughput ratio of best runs (medians beside); appends the line, returns whether it meets the target."""
        line, ok = ratio_line(label, ours[f"{key}_best"] / other[f"{key}_best"], target,
                              median=ours[f"{key}_median"] / other[f"{key}_median"])
        lines.append(line)
        return ok

    if "dpo" not in skip:
        print_table("DPO (whole stage includes tokenisation and the reference pass)", DPO_CONFIGS, stats)
        print_breakdown(DPO_CONFIGS, stats)
        ours = stats["ibridge_dpo"]
        all_ok &= compare("ibridge DPO / TRL, reference on the fly (whole stage)", ours, stats["trl_dpo"], "whole", 1.5)
        all_ok &= compare("ibridge DPO / TRL, precomputed reference (whole stage)", ours,
                          stats["trl_dpo_precompute"], "whole", 1.0)
        all_ok &= compare("ibridge DPO / bare loop (optimisation steps)", ours, stats["bare_dpo"], "steps", 0.9)
        for other in ("trl_dpo", "trl_dpo_precompute"):
            which = "TRL on the fly" if other == "trl_dpo" else "TRL precomputed"
            line, ok = ratio_line(f"ibridge DPO peak RSS / {which} (medians)", ours["peak_mb"] / stats[other]["peak_mb"],
                                  1.0, "<=")
            lines.append(line)
            all_ok &= ok
    if "sft" not in skip:
        print_table("SFT", SFT_CONFIGS, stats)
        print_breakdown(SFT_CONFIGS, stats)
        ours = stats["ibridge_sft"]
        all_ok &= compare("ibridge SFT / TRL SFT (whole stage)", ours, stats["trl_sft"], "whole", 1.2)
        all_ok &= compare("ibridge SFT / bare loop (optimisation steps)", ours, stats["bare_sft"], "steps", 0.9)
        line, ok = ratio_line("ibridge SFT peak RSS / TRL SFT (medians)", ours["peak_mb"] / stats["trl_sft"]["peak_mb"], 1.0,
                              "<=")
        lines.append(line)
        all_ok &= ok
    if lines:
        print("\nTargets (ratios of best runs; medians in brackets; 'within 10% of the bare loop' read as >= 0.90x)")
        print("\n".join(lines))

    if "check" not in skip:
        check = spawn("check", spec_file)
        raw["check"] = check
        worst = check["max_abs_diff"]
        ok = max(worst.values()) <= 1e-5 and not check["dpo_sequences_mismatched"] \
            and not check["sft_sequences_mismatched"]
        all_ok &= ok
        print(f"\nCorrectness on identical batches ({check['batches']} batches, policy != reference; ibridge "
              f"{'padded and packed forward' if check['forwards'] == 2 else 'padded forward'}): "
              f"{'ok' if ok else 'FAILED'}")
        print(f"  token sequences: DPO {check['dpo_sequences_mismatched']} mismatched, tokens ibridge/TRL "
              f"{check['dpo_tokens'][0]}/{check['dpo_tokens'][1]}; SFT {check['sft_sequences_mismatched']} mismatched, "
              f"tokens {check['sft_tokens'][0]}/{check['sft_tokens'][1]}")
        print("  max |ibridge - TRL|: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()) + "  (tolerance 1e-5)")
        print("  last batch (ibridge, TRL): " + ", ".join(f"{k} ({a:.6f}, {b:.6f})"
                                                       for k, (a, b) in check["last_batch"].items()))

    if "defaults" not in skip and args.default_steps > 0:
        dspec = Spec(spec, sft=dict(spec.sft, steps=args.default_steps), dpo=dict(spec.dpo, steps=args.default_steps))
        dfile = work / "spec_defaults.json"
        dfile.write_text(json.dumps(dspec))
        print(f"\nEach tool with its own defaults on this machine (a user-facing fact, not the speed comparison; "
              f"TRL: {args.default_steps} steps, one run each)")
        print("  TRL on a CPU-only machine refuses to start with its defaults (bf16=True: \"Your setup doesn't "
              "support bf16/gpu\") until use_cpu=True is given; with use_cpu=True and everything else its default "
              "(model loaded by TRL from the path):")
        for name, kind in (("trl_sft_defaults", "sft"), ("trl_dpo_defaults", "dpo")):
            run = spawn(name, dfile)
            raw[name] = run
            s = run["settings"]
            print(f"    TRL {kind.upper()}: bf16 autocast {s['bf16']}, gradient checkpointing "
                  f"{s['gradient_checkpointing']}, attention {s['attn_implementation']}, lr {s['learning_rate']:g}, "
                  f"{s['optim']}: {fmt_rate(rates(run)[1]).strip()} tok/s over the steps "
                  f"({run['steps_s'] / max(run['steps'], 1):.2f} s/step)")
        ours = [f"{kind.upper()} {fmt_rate(stats[f'ibridge_{kind}']['steps_best']).strip()} tok/s"
                for kind in ("sft", "dpo") if f"ibridge_{kind}" in stats]
        print("  ibridge's defaults on this machine are the configuration measured above (trainer=auto: fp32, "
              "eager attention on CPU, no checkpointing, padding-free packing)" + (": " + ", ".join(ours) if ours
                                                                                     else ""))

    if "objectives" not in skip:
        print(f"\nf-divergence objectives: step throughput vs sft (warm reference cache; "
              f"benchmarks/bench_objectives.py --steps {args.objective_steps} --repeats 3, same threads)", flush=True)
        pinned = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
        for granularity in ("sequence", "token"):
            cmd = [sys.executable, str(HERE / "bench_objectives.py"), "--steps", str(args.objective_steps),
                   "--repeats", "3", "--granularity", granularity, *args.overrides]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                  env=dict(os.environ, **pinned, TQDM_DISABLE="1", WANDB_MODE="disabled"))
            table = proc.stdout.strip().splitlines()
            print("\n".join("  " + line for line in table[-8:]) if proc.returncode == 0 else
                  f"  bench_objectives failed:\n{proc.stderr[-2000:]}")
            raw[f"objectives_{granularity}"] = table
            all_ok &= proc.returncode == 0 and "< 0.9 target" not in proc.stdout

    if "generation" not in skip:
        gen = spawn("generation", spec_file)
        raw["generation"] = gen
        plain_s, ours_s = min(gen["times"]["plain"]), min(gen["times"]["ibridge"])
        print(f"\nGeneration in the eval job ({gen['prompts']} eval prompts, greedy, max_new_tokens "
              f"{gen['max_new_tokens']}, batch {gen['batch_size']}, base model; best of {len(gen['times']['plain'])})")
        print(f"  plain model.generate (prompts in order): {gen['tokens']['plain'] / plain_s / 1000:6.2f}k tok/s "
              f"({gen['tokens']['plain']} tokens, {plain_s:.2f} s)")
        print(f"  ibridge.evaluation.generate:             {gen['tokens']['ibridge'] / ours_s / 1000:6.2f}k tok/s "
              f"({gen['tokens']['ibridge']} tokens, {ours_s:.2f} s)  ratio {plain_s / ours_s:.2f}x")
        # The eval job as a user runs it: a fresh process, base model against itself as reference (so the
        # sampled KL and implicit-reward accuracy run too), no logger.
        out_dir = Path(tempfile.mkdtemp(prefix="bench-evaljob-"))
        pinned = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "ibridge", "eval", "logger=none", f"reference={base}",
                               f"output_dir={out_dir}", "resume=false", *args.overrides],
                              capture_output=True, text=True, cwd=ROOT,
                              env=dict(os.environ, **pinned, TQDM_DISABLE="1", WANDB_MODE="disabled"))
        job_s = time.perf_counter() - start
        raw["eval_job_s"] = job_s
        ok = gen["eval_s"] < 60 and job_s < 60 and proc.returncode == 0
        all_ok &= ok
        print(f"  eval of the default world (generate, judge, sampled KL, implicit-reward accuracy): "
              f"evaluate_checkpoint {gen['eval_s']:.1f} s; `ibridge eval reference=<base>` as a fresh process "
              f"{job_s:.1f} s wall{'' if proc.returncode == 0 else ' (FAILED: ' + proc.stderr[-300:] + ')'} "
              f"(target < 60 s) {'ok' if ok else 'MISSED'}")

    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))
    print(f"\n{'all targets met' if all_ok else 'some targets MISSED'}; benchmark wall time "
          f"{time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
