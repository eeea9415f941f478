"""A tiny model and uneven examples on which one optimiser step is compared with one batch.

Shared by tests/test_loss_weighting.py (one process) and tests/loss_weighting_worker.py
(2 gloo ranks under torchrun); not a test module.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ibridge.data.collate import collate_demonstrations, collate_pairs
from ibridge.objectives import build_objective
from ibridge.stages import demonstration_step, loss_units, preference_step
from ibridge.training import OptimSettings, optimise
from ibridge.updates import TorchUpdate

VOCAB = 32
PAD = 0
# One objective per way of averaging: tokens (sft, token-granularity jsd), sequences
# (sequence-granularity chi2) and pairs (dpo); and asft, token-averaged with a KL over the
# vocabulary against a reference model run in every micro-batch (`reference_model`).
OBJECTIVES = {
    "sft": {"name": "sft"},
    "jsd_token": {"name": "jsd", "beta": 0.5, "granularity": "token"},
    "chi2_sequence": {"name": "chi2", "beta": 0.5, "granularity": "sequence"},
    "dpo": {"name": "dpo", "beta": 0.5},
    "asft": {"name": "asft", "kl_coef": 0.5},
}
# Very uneven lengths: a 2-token demonstration beside 30-token ones. 7 examples, so that
# micro-batches of 2 leave a short last one (and, on 2 ranks, a stand-in).
LENGTHS = [30, 2, 25, 3, 28, 2, 17]


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, attn_implementation="eager")
    return LlamaForCausalLM(config)


def _sequence(prompt: int, response: int, generator) -> dict:
    ids = torch.randint(1, VOCAB, (prompt + response,), generator=generator).tolist()
    labels = [-100] * prompt + ids[prompt:]
    ref = (-3.0 + torch.randn(prompt + response - 1, generator=generator)).tolist()  # fixed "reference"
    return {"input_ids": ids, "labels": labels, "ref_logps": ref}


def examples(kind: str) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    if kind != "dpo":
        return [_sequence(3, n, generator) for n in LENGTHS]
    pairs = []
    for n in LENGTHS:
        chosen, rejected = _sequence(3, n, generator), _sequence(3, max(1, n // 2 + 1), generator)
        pairs.append({"chosen": chosen, "rejected": rejected,
                      "ref_chosen": float(sum(chosen["ref_logps"])), "ref_rejected": float(sum(rejected["ref_logps"]))})
    return pairs


def parts(kind: str):
    """(objective, compute, collate, count_units) as the stages wire them."""
    objective = build_objective(OBJECTIVES[kind])
    if kind == "dpo":
        return objective, preference_step(objective), lambda items: collate_pairs(items, PAD), loss_units(objective)
    # Another draw of the tiny model as the reference, so that the KL and its gradient are not zero.
    reference = tiny_model(seed=1).eval().requires_grad_(False) if objective.needs_reference_logits else None
    return (objective, demonstration_step(objective, reference), lambda items: collate_demonstrations(items, PAD),
            loss_units(objective))


def one_batch_gradient(kind: str) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The independent computation: every example in one batch, one backward. Returns the
    batch's loss (as ``train/loss``) and metrics, and the gradient."""
    model = tiny_model()
    _, compute, collate, _ = parts(kind)
    out = compute(model, collate(examples(kind)))
    out.loss.backward()
    metrics = {"train/loss": float(out.loss.detach()), **{key: float(v) for key, v in out.metrics.items()}}
    return metrics, {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def loop_gradient(kind: str, batch_size: int, grad_accum: int, runtime, monkeypatch=None) -> tuple[dict, dict]:
    """The first optimiser step of `optimise` over the same examples: the metrics it logs
    (``log_every=1``) and the gradient it hands to the optimiser (after any data-parallel
    reduction)."""
    captured: dict = {}
    original = TorchUpdate.update

    def spy(self, step_loss, where):
        captured["grads"] = {name: p.grad.detach().clone() for name, p in self.model.named_parameters()}
        return original(self, step_loss, where)

    if monkeypatch is not None:
        monkeypatch.setattr(TorchUpdate, "update", spy)
    else:
        TorchUpdate.update = spy
    try:
        _, compute, collate, count = parts(kind)
        settings = OptimSettings(lr=1e-3, max_steps=1, batch_size=batch_size, grad_accum=grad_accum,
                                 max_grad_norm=1e9, log_every=1, pack_sequences=False)
        logged: list = []
        optimise(tiny_model(), examples(kind), collate, compute, settings, runtime,
                 log=lambda metrics, step: logged.append(metrics), count_units=count)
    finally:
        TorchUpdate.update = original
    return logged[0], captured["grads"]


def metric_gaps(logged: dict, reference: dict) -> dict[str, float]:
    """|logged - one batch| for every metric of the one-batch computation (JSON-able); a metric
    the loop did not log reads infinity."""
    return {key: abs(logged[key] - value) if key in logged else float("inf") for key, value in reference.items()}


def gradient_gap(grads: dict, ref_grads: dict) -> dict:
    """The largest absolute difference from the reference gradient, and the reference's own
    largest entry to judge it against (JSON-able, for the torchrun workers' reports)."""
    return {"grad_diff": max(float((grads[name] - ref_grads[name]).abs().max()) for name in ref_grads),
            "grad_scale": max(float(ref_grads[name].abs().max()) for name in ref_grads)}
