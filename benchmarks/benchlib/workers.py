"""One benchmark configuration per process: ibridge's stage, TRL's trainers, the bare loop
(the correctness check is benchlib/trl_check.py).

Each worker takes the `Spec` and returns a dict (the driver adds the process's peak RSS).
Tokens are non-padding tokens (``attention_mask.sum()`` per training batch, chosen plus
rejected for DPO), as TRL counts them. "Steps" time is the optimisation steps alone:
forward, backward, clipping and the optimiser step (TRL: the span between its
on_step_begin and on_step_end callbacks; ibridge: the loop minus batch collation).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from .common import assistant, compose_cfg, hwm_mb, reset_hwm, rss_mb, user

KINDS = {"sft": "demonstrations", "dpo": "preferences"}


def runtime_for(spec):
    import torch

    from ibridge.runtime import resolve_runtime

    cfg = compose_cfg(spec.overrides)
    runtime = resolve_runtime(cfg.trainer)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    return cfg, runtime


def settings_for(spec, kind: str):
    from ibridge.training import OptimSettings

    s = spec[kind]
    return OptimSettings(lr=s["lr"], max_steps=s["steps"], batch_size=s["batch_size"],
                         weight_decay=s["weight_decay"], max_grad_norm=s["max_grad_norm"],
                         log_every=s["log_every"], warmup_ratio=spec.warmup_ratio, schedule=spec.schedule,
                         seed=spec.seed)


def encode(spec, kind: str, tokenizer):
    from ibridge.data.formatting import encode_split

    examples = json.loads(Path(spec.data).read_text())[KINDS[kind]]
    return encode_split(tokenizer, examples, KINDS[kind], spec.max_length)[0]


def attach_cold_reference(spec, encoded, kind, cfg, runtime, pad):
    """Reference log-probs from a fresh cache folder: the reference pass runs (and is timed)."""
    from omegaconf import open_dict

    from ibridge.stages import attach_reference

    with open_dict(cfg):
        cfg.model.cache_dir = tempfile.mkdtemp(prefix="bench-refcache-")
    attach_reference(encoded, KINDS[kind], Path(spec.base), SimpleNamespace(cfg=cfg, runtime=runtime), pad)


def worker_ibridge(spec, kind: str) -> dict:
    """ibridge's stage as `train_stage` wires it, minus checkpoint writing and the drift evaluation.

    Besides time: the memory before the model ("rss_data_mb", after tokenisation), the
    reference pass's peak and the training loop's peak apart (`reset_hwm`), and the largest
    micro-batch (tokens, scored tokens, packed row width) and reference-pass batch (padded
    tokens), which the memory model of docs/memory.md (benchlib/memory.py) takes.
    """
    import torch

    cfg, runtime = runtime_for(spec)
    from ibridge.data.collate import collate_demonstrations, collate_pairs
    from ibridge.models import load_model, load_tokenizer
    from ibridge.objectives import build_objective
    from ibridge.packing import pack_plan
    from ibridge.refcache import DEFAULT_MAX_BATCH_TOKENS, token_budget_batches
    from ibridge.stages import demonstration_step, loss_units, preference_step
    from ibridge.training import optimise

    objective = build_objective({"name": "sft"} if kind == "sft" else {"name": "dpo", "beta": spec.dpo["beta"]})
    collated = {"s": 0.0}
    largest = {"tokens": 0, "scored": 0, "row_width": 0}
    rss0 = rss_mb()
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(spec.base)
    pad = tokenizer.pad_token_id
    encoded = encode(spec, kind, tokenizer)
    rss_data = rss_mb()
    peak_before = hwm_mb()
    reset_hwm()  # resets ru_maxrss too: the process's peak is the largest of the phases' (peak_process_mb)
    t_ref = time.perf_counter()
    if objective.needs_reference:
        attach_cold_reference(spec, encoded, kind, cfg, runtime, pad)
        sequences = [e[side] for side in ("chosen", "rejected") for e in encoded]
        lengths = [len(seq["input_ids"]) for seq in sequences]
        batches = token_budget_batches(lengths, DEFAULT_MAX_BATCH_TOKENS)
        padded, biggest = max((len(b) * lengths[b[0]], b) for b in batches)
        largest["reference_batch"] = padded
        largest["reference_tokens"] = sum(lengths[i] for i in biggest)
        largest["reference_scored"] = sum(label != -100 for i in biggest for label in sequences[i]["labels"][1:])
    t_ref = time.perf_counter() - t_ref
    peak_reference = hwm_mb()
    rss_before_model = rss_mb()  # after the reference pass: what the allocator kept of it counts here
    model = load_model(spec.base, runtime)
    base_collate = collate_demonstrations if kind == "sft" else collate_pairs

    def collate(items):
        start = time.perf_counter()
        batch = base_collate(items, pad)
        collated["s"] += time.perf_counter() - start
        plan = pack_plan(batch["attention_mask"])
        largest["tokens"] = max(largest["tokens"], int(batch["attention_mask"].sum()))
        largest["scored"] = max(largest["scored"], int((batch["labels"][:, 1:] != -100).sum()))
        largest["row_width"] = max(largest["row_width"], batch["input_ids"].shape[1] if plan is None
                                   else plan["width"])
        return batch

    step = demonstration_step(objective) if kind == "sft" else preference_step(objective)
    reset_hwm()
    t_loop = time.perf_counter()
    summary = optimise(model, encoded, collate, step, settings_for(spec, kind), runtime, desc=f"ibridge {kind}",
                       count_units=loss_units(objective))
    t1 = time.perf_counter()
    peak_training = hwm_mb()
    del model
    return {"tokens": summary.tokens, "steps": summary.steps, "stage_s": t1 - t0,
            "steps_s": (t1 - t_loop) - collated["s"], "collate_s": collated["s"], "ref_s": t_ref,
            "prep_s": t_loop - t0, "rss_start_mb": rss0, "rss_data_mb": rss_data,
            "rss_before_model_mb": rss_before_model, "peak_reference_mb": peak_reference,
            "peak_training_mb": peak_training, "peak_process_mb": max(peak_before, peak_reference, peak_training),
            "largest": largest,
            "final_loss": summary.final_metrics.get("train/loss"), "threads": torch.get_num_threads(),
            "attn_implementation": runtime.attn_implementation}


def bare_batches(spec, kind: str, runtime):
    """ibridge's own batches for this stage, collated (with reference log-probs for DPO), then packed
    with ibridge's plan (`ibridge.packing.pack_plan`), so the bare loop runs the same packed rows."""
    import torch

    from ibridge.batching import optimiser_steps
    from ibridge.data.collate import collate_demonstrations, collate_pairs
    from ibridge.models import load_tokenizer
    from ibridge.packing import pack_plan

    tokenizer = load_tokenizer(spec.base)
    pad = tokenizer.pad_token_id
    encoded = encode(spec, kind, tokenizer)
    if kind == "dpo":
        attach_cold_reference(spec, encoded, kind, compose_cfg(spec.overrides), runtime, pad)
    settings = settings_for(spec, kind)
    collate = collate_demonstrations if kind == "sft" else collate_pairs
    stream = optimiser_steps(len(encoded), settings.batch_size, settings.grad_accum, settings.seed)
    steps = [next(stream)[1] for _ in range(settings.total_steps(len(encoded)))]
    out = []
    for plan_ in steps:
        for micro in plan_:
            batch = collate([encoded[i] for i in micro.indices], pad)
            ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            rows, width = ids.shape
            targets = torch.cat([labels[:, 1:], labels.new_full((rows, 1), -100)], dim=1)  # next-token labels
            seq = torch.arange(rows).unsqueeze(1).expand(rows, width).masked_fill(mask == 0, -1)
            plan = pack_plan(mask)
            if plan is None:
                inputs = {"input_ids": ids, "attention_mask": mask}
            else:
                valid, dst, n = plan["valid"], plan["dst"][plan["valid"]], plan["rows"] * plan["width"]
                packed = {name: torch.full((n,), fill, dtype=torch.long) for name, fill in
                          (("ids", 0), ("targets", -100), ("seq", -1))}
                for name, source in (("ids", ids), ("targets", targets), ("seq", seq)):
                    packed[name][dst] = source[valid]
                shape = (plan["rows"], plan["width"])
                ids, targets, seq = (packed[k].view(shape) for k in ("ids", "targets", "seq"))
                inputs = {"input_ids": ids, "position_ids": plan["positions"]}
                if runtime.attn_implementation == "eager":  # as ibridge gives eager attention its mask
                    allowed = (plan["segments"].unsqueeze(2) == plan["segments"].unsqueeze(1)) & torch.ones(
                        shape[1], shape[1], dtype=torch.bool).tril()
                    inputs["attention_mask"] = torch.zeros(shape[0], 1, shape[1], shape[1]).masked_fill_(
                        ~allowed.unsqueeze(1), torch.finfo(torch.float32).min)
            entry = {"inputs": inputs, "targets": targets, "seq": seq, "sequences": rows,
                     "tokens": int(mask.sum())}
            if kind == "dpo":
                entry["ref"] = (batch["ref_chosen"], batch["ref_rejected"])
            out.append(entry)
    return out


def worker_bare(spec, kind: str, head: str = "full") -> dict:
    """The practical ceiling: forward, loss, backward, clipping, AdamW step over ibridge's packed batches;
    nothing else (no scheduler, metrics, host syncs or checks).

    head "full": the model's logits at every position and ``F.cross_entropy``, as a plain
    PyTorch loop computes them. head "chunked": the decoder's last hidden states at scored
    tokens through ibridge's chunked head (ibridge/lmhead.py), the same arithmetic as
    ibridge's loop at a large vocabulary, without anything else of the loop.
    """
    import torch
    import torch.nn.functional as F

    cfg, runtime = runtime_for(spec)
    from ibridge.lmhead import linear_label_logps
    from ibridge.models import load_model

    batches = bare_batches(spec, kind, runtime)
    model = load_model(spec.base, runtime)
    model.train()
    s = spec[kind]
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=0.0)
    rss0 = rss_mb()
    tokens = 0
    t0 = time.perf_counter()
    for batch in batches:
        targets, seq = batch["targets"], batch["seq"]
        if head == "full":
            logits = model(**batch["inputs"], use_cache=False).logits  # (R, L, V)
            token = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
            scored = targets.reshape(-1) != -100
            seq = seq.reshape(-1)
        else:
            hidden = model.model(**batch["inputs"], use_cache=False).last_hidden_state  # (R, L, H)
            scored = targets != -100
            token = linear_label_logps(hidden[scored], model.lm_head.weight, None, targets[scored])  # (S,)
            seq, scored = seq[scored], torch.ones_like(token, dtype=torch.bool)
        if kind == "sft":
            loss = -token.sum() / scored.sum()
        else:
            sums = torch.zeros(batch["sequences"]).index_add(0, seq.clamp(min=0), token * scored)
            chosen, rejected = sums.chunk(2)
            ref_chosen, ref_rejected = batch["ref"]
            loss = -F.logsigmoid(spec.dpo["beta"] * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s["max_grad_norm"])  # the stage's maths: it clips
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch["tokens"]
    t1 = time.perf_counter()
    return {"tokens": tokens, "steps": len(batches), "stage_s": None, "steps_s": t1 - t0, "rss_start_mb": rss0,
            "final_loss": float(loss), "threads": torch.get_num_threads()}


def trl_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Time between on_step_begin and on_step_end: forward(s), backward, clipping, optimiser step."""

        def __init__(self):
            self.total = 0.0
            self.steps = 0
            self._start = None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.total += time.perf_counter() - self._start
            self.steps += 1

    return StepTimer()


def trl_args(config_cls, spec, kind: str, out: str, defaults: bool = False, **extra):
    s = spec[kind]
    common = dict(output_dir=out, per_device_train_batch_size=s["batch_size"], max_steps=s["steps"],
                  report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True, seed=spec.seed,
                  max_length=spec.max_length)
    if defaults:  # TRL's own defaults for precision, checkpointing, lr, schedule; logging as usual
        # use_cpu=True is needed on a CPU-only machine: without it TRL's default bf16=True refuses to start
        # ("Your setup doesn't support bf16/gpu").
        return config_cls(**common, use_cpu=True, **extra)
    if kind == "sft" and spec.trl.get("sft_padding_free"):
        # TRL enforces no max_length without packing when padding-free; the data fit max_length already.
        extra["padding_free"] = True
        common["max_length"] = None
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


def trl_model(spec, path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation=spec.trl["attn_implementation"])


def worker_trl(spec, kind: str, precompute: bool = False, defaults: bool = False) -> dict:
    import torch

    runtime_for(spec)  # threads
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    sft_data, dpo_data = trl_datasets(spec)
    out = tempfile.mkdtemp(prefix="bench-trl-")
    timer = trl_timer()
    rss0 = rss_mb()
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec.base)
    model = spec.base if defaults else trl_model(spec, spec.base)  # defaults: TRL loads it, its own dtype/attention
    if kind == "sft":
        args = trl_args(SFTConfig, spec, "sft", out, defaults)
        trainer = SFTTrainer(model=model, args=args, train_dataset=sft_data, processing_class=tokenizer,
                             callbacks=[timer])
    else:
        args = trl_args(DPOConfig, spec, "dpo", out, defaults, beta=spec.dpo["beta"],
                        precompute_ref_log_probs=precompute)
        trainer = DPOTrainer(model=model, args=args, train_dataset=dpo_data, processing_class=tokenizer,
                             callbacks=[timer])
    t_loop = time.perf_counter()
    result = trainer.train()
    t1 = time.perf_counter()
    settings = {"bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing,
                "attn_implementation": trainer.model.config._attn_implementation,
                "padding_free": getattr(trainer, "padding_free", False),
                "dtype": str(trainer.model.dtype), "learning_rate": args.learning_rate,
                "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", str(args.lr_scheduler_type)),
                "optim": getattr(args.optim, "value", str(args.optim))}
    # TRL counts attention_mask.sum() per training batch (chosen + rejected for DPO), as ibridge does.
    tokens = getattr(trainer, "_total_train_tokens", None) or trainer.state.num_input_tokens_seen
    return {"tokens": int(tokens), "steps": timer.steps, "stage_s": t1 - t0,
            "steps_s": timer.total, "prep_s": t_loop - t0, "rss_start_mb": rss0,
            "final_loss": float(result.training_loss), "threads": torch.get_num_threads(), "settings": settings}


# Each subprocess worker by name: what it runs, given the spec.
WORKERS = {
    "ibridge_sft": (lambda spec: worker_ibridge(spec, "sft")),
    "ibridge_dpo": (lambda spec: worker_ibridge(spec, "dpo")),
    "bare_sft": (lambda spec: worker_bare(spec, "sft")),
    "bare_dpo": (lambda spec: worker_bare(spec, "dpo")),
    "bare_chunked_sft": (lambda spec: worker_bare(spec, "sft", head="chunked")),
    "bare_chunked_dpo": (lambda spec: worker_bare(spec, "dpo", head="chunked")),
    "trl_sft": (lambda spec: worker_trl(spec, "sft")),
    "trl_dpo": (lambda spec: worker_trl(spec, "dpo")),
    "trl_dpo_precompute": (lambda spec: worker_trl(spec, "dpo", precompute=True)),
    "trl_sft_defaults": (lambda spec: worker_trl(spec, "sft", defaults=True)),
    "trl_dpo_defaults": (lambda spec: worker_trl(spec, "dpo", defaults=True)),
}

LABELS = {
    "trl_dpo": "TRL DPOTrainer (reference on the fly)",
    "trl_dpo_precompute": "TRL DPOTrainer (precompute_ref_log_probs)",
    "ibridge_dpo": "ibridge dpo stage (cold reference cache)",
    "bare_dpo": "bare PyTorch loop (DPO, same packed batches)",
    "bare_chunked_dpo": "bare loop, ibridge's chunked head (DPO)",
    "trl_sft": "TRL SFTTrainer",
    "ibridge_sft": "ibridge sft stage",
    "bare_sft": "bare PyTorch loop (SFT, same packed batches)",
    "bare_chunked_sft": "bare loop, ibridge's chunked head (SFT)",
}
DPO_CONFIGS = ["trl_dpo", "trl_dpo_precompute", "ibridge_dpo", "bare_dpo"]
SFT_CONFIGS = ["trl_sft", "ibridge_sft", "bare_sft"]
