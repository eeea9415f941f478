"""`ibridge qlogit`: logits as a Q-function, for a checkpoint against its reference (docs/design.md §1).

    ibridge qlogit checkpoint=outputs/.../sft reference=null qlogit.beta=0.1

For the chosen and the rejected response of held-out preference pairs it computes, per
response token, ``Q(s_t, a_t)``, ``V(s_t)``, the per-token implicit reward
``beta * log pi(a_t|s_t) / pi_ref(a_t|s_t)`` and ``r_t = Q(s_t, a_t) - V(s_{t+1})``
(:mod:`ibridge.analysis.qlogit`), checks both identities of docs/design.md §1 on every analysed
sequence, and asks the empirical questions (``qlogit/…`` in metrics.jsonl and wandb, and
``results.json["qlogit"]``):

- ``identity_max_abs_error_token`` / ``identity_max_abs_error_sequence``: the largest
  absolute errors of ``beta * log pi/pi_ref = Q - V`` (per token) and of
  ``sum_t r_t = r(x, y) + V(s_0)`` (per sequence); float64 arithmetic, so ~1e-12.
- ``auroc_token_reward`` / ``auroc_r_t`` (toy world only, from the gold judge): how well the
  per-token implicit reward, and ``r_t``, find the first wrong token of a response.
  Convention: over the responses (chosen or rejected) that have an error, the tokens up to
  and including the first wrong one; positive class = "this is the first wrong token";
  score = the NEGATIVE reward (a lower per-token reward should flag the error). None when
  undefined (one class empty). The positive is always the last token considered, so a score
  that only drifts with position already beats 0.5: read these against
  ``auroc_position_only`` (the AUROC of the token index itself), or read
  ``auroc_token_reward_position_matched`` / ``auroc_r_t_position_matched``, which compare
  tokens at the same position only (0.5 = chance whatever the position effects;
  :func:`ibridge.analysis.qlogit.position_matched_auroc`).
- ``implicit_reward_acc``: share of pairs whose sequence implicit reward ``r(x, y)`` ranks the
  chosen response above the rejected one (ties count half).
- ``spearman_reward_gold`` (toy world only): Spearman correlation between ``r(x, y)`` and the
  gold reward over all analysed responses (None when undefined, e.g. policy == reference).
- ``num_pairs`` analysed, and a few counts and means.

Files under ``<run_dir>/qlogit/``: ``tokens.jsonl`` (one line per analysed response: prompt,
response, kind, tokens, token_reward, q, v, r_t, gold reward, first_error, ...),
``qlogit.json`` (the scalars), and the figures ``token_heatmap.png``,
``reward_distribution.png``, ``q_v_positions.png`` (also logged to wandb).

Per-state logit offsets: Q, V, ``r_t`` and ``auroc_r_t*`` change when a constant is added to
all logits of a state (which changes no probability); the per-token and sequence implicit
rewards and the metrics built on them do not (``OFFSET_INVARIANT`` in
:mod:`ibridge.analysis.qlogit`, which explains why).

Settings (``qlogit.*``): ``beta`` (0.1), ``num_pairs`` (200; -1 all), ``num_figure_pairs`` (4),
and optionally ``batch_size`` (32). ``checkpoint`` is the policy (null: the base model) and
``reference`` its reference; both must share the tokenizer. ``reference=null`` means the
reference the checkpoint was trained against, read from its stage record (``stage.json``
beside ``checkpoint/``: the base model for an SFT stage, the SFT model for a DPO stage), and
the base model for a checkpoint without one. ``results.json["qlogit"]`` names the reference
used (``reference``) and where it came from (``reference_from``).

The forward passes run in float32 whatever ``trainer.precision`` says: Q and V are differences
of logits, and bf16 logits (resolution 1/16 at 10) would bury the small differences between
a checkpoint and its reference.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ibridge.analysis.qlogit import (
    check_identities,
    first_error_auroc,
    position_matched_auroc,
    position_only_auroc,
    q_values,
    sequence_values,
)
from ibridge.data.collate import pad_sequences
from ibridge.data.formatting import EncodeStats, encode_response
from ibridge.evaluation.stats import preferences_from_scores, spearman
from ibridge.io import write_json_atomic
from ibridge.models import load_tokenizer
from ibridge.scoring import fp32_matmuls, load_scoring_model
from ibridge.stages import STAGE_RECORD

log = logging.getLogger(__name__)

KINDS = ("chosen", "rejected")
# Upper bound on the float64 logits one batch may hold (B * T * V elements, 2**25 = 256 MiB per model).
MAX_BATCH_ELEMENTS = 2**25


def settings(cfg) -> dict:
    block = cfg.get("qlogit") or {}
    out = {
        "beta": float(block.get("beta", 0.1)),
        "num_pairs": int(block.get("num_pairs", 200)),
        "num_figure_pairs": int(block.get("num_figure_pairs", 4)),
        "batch_size": int(block.get("batch_size", 32)),
    }
    if out["beta"] <= 0:
        raise ValueError(f"qlogit.beta={out['beta']}: must be > 0")
    return out


def run(ctx) -> None:
    cfg = ctx.cfg
    opts = settings(cfg)
    policy_path = ctx.checkpoint_or_base(cfg.checkpoint)
    reference_path, reference_from = resolve_reference(ctx, policy_path)
    log.info("qlogit: reference %s (%s)", reference_path, reference_from)
    out_dir = Path(ctx.run_dir) / "qlogit"
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx.logger.start(
        "qlogit",
        ctx.run_name("qlogit"),
        {"checkpoint": str(policy_path), "reference": str(reference_path), "qlogit_settings": opts},
    )
    if Path(policy_path).resolve() == Path(reference_path).resolve():
        log.warning("qlogit: policy and reference are the same model (%s): every Q, V and reward is 0", policy_path)

    tokenizer = load_tokenizer(policy_path, ctx.runtime, ctx.cfg.model)
    _check_same_tokenizer(tokenizer, reference_path)
    pairs = _encode_pairs(ctx, tokenizer, opts["num_pairs"], int(cfg.model.max_length))
    # float32 weights with an attention kernel that runs in float32 (sdpa under a flash run).
    policy = load_scoring_model(policy_path, ctx.runtime)
    reference = load_scoring_model(reference_path, ctx.runtime)

    sequences = [pair[kind] for kind in KINDS for pair in pairs]  # all chosen, then all rejected
    with fp32_matmuls(ctx.runtime):
        values, err_token, err_sequence = analyse(
            policy, reference, [s["encoded"] for s in sequences], opts["beta"], ctx.runtime.device,
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, opts["batch_size"],
        )
    records = [_record(seq, vals, tokenizer) for seq, vals in zip(sequences, values, strict=True)]
    metrics = summarise(records, len(pairs), err_token, err_sequence, opts["beta"])
    metrics.update({"reference": str(reference_path), "reference_from": reference_from})
    log.info(
        "qlogit: identity errors token %.2e sequence %.2e; implicit-reward acc %.3f; AUROC token reward %s "
        "(position-matched %s, position only %s), r_t %s",
        err_token, err_sequence, metrics["implicit_reward_acc"], metrics["auroc_token_reward"],
        metrics["auroc_token_reward_position_matched"], metrics["auroc_position_only"], metrics["auroc_r_t"],
    )

    _write_tokens(out_dir / "tokens.jsonl", records)
    write_json_atomic(out_dir / "qlogit.json", metrics)
    scalars = {f"qlogit/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    ctx.logger.log(scalars, step=0)
    ctx.logger.summary(scalars)
    for key, path in draw_figures(records, metrics, out_dir, opts["num_figure_pairs"]).items():
        ctx.logger.log_image(f"qlogit/{key}", path)
    ctx.results["qlogit"] = metrics
    ctx.logger.finish()


# --------------------------------------------------------------------------- data


def resolve_reference(ctx, policy_path) -> tuple[Path | str, str]:
    """The reference to compare `policy_path` with, and where that choice came from.

    ``reference=`` when set; else the ``reference`` of the checkpoint's stage record
    (``<stage>/stage.json`` beside ``<stage>/checkpoint``), the model that stage was trained
    against; else the base model.
    """
    cfg = ctx.cfg
    if cfg.get("reference"):
        return ctx.checkpoint_or_base(cfg.reference), "reference="
    record_file = Path(str(policy_path)).parent / STAGE_RECORD
    if not cfg.get("checkpoint") or not record_file.is_file():
        return ctx.base_model, "base model"
    try:
        recorded = json.loads(record_file.read_text()).get("reference")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{record_file}: unreadable stage record ({err}); pass reference=<folder>") from err
    if not recorded:
        raise ValueError(f"{record_file}: no 'reference' in the stage record; pass reference=<folder>")
    local = Path(str(recorded)).expanduser()
    if local.exists():
        return local, f"stage record {record_file}"
    if cfg.model.kind != "toy" and str(recorded) == str(ctx.base_model):  # a hub name: the base model
        return ctx.base_model, f"stage record {record_file}"
    raise FileNotFoundError(
        f"{record_file}: its reference {recorded} does not exist here; pass reference=<folder>"
    )


def _check_same_tokenizer(tokenizer, reference_path: Path) -> None:
    try:
        ref_tokenizer = load_tokenizer(reference_path)
    except (OSError, ValueError) as err:  # a reference folder without tokenizer files
        log.warning("qlogit: could not load the reference's tokenizer (%s); comparing logits shapes only", err)
        return
    if tokenizer.get_vocab() != ref_tokenizer.get_vocab():
        raise ValueError(
            f"reference={reference_path}: its tokenizer differs from the checkpoint's; Q = beta * (l_pi - l_ref) "
            "needs both models over the same vocabulary"
        )


def _encode_pairs(ctx, tokenizer, num_pairs: int, max_length: int) -> list[dict]:
    """Held-out pairs (falling back to training pairs), encoded, with their gold verdicts."""
    examples = ctx.source.examples("heldout_pairs")
    if not examples:
        log.warning("qlogit: the data has no held-out pairs; analysing training preference pairs instead")
        examples = ctx.source.examples("preferences")
    if num_pairs >= 0:
        examples = examples[:num_pairs]
    stats = EncodeStats()
    gold = _gold_judge(ctx.source)
    pairs = []
    for example in examples:
        encoded = {k: encode_response(tokenizer, example["prompt"], example[k], max_length, stats) for k in KINDS}
        if any(value is None for value in encoded.values()):
            continue
        pair = {}
        for kind in KINDS:
            reward, first_error = gold(example["prompt"], example[kind]) if gold else (
                example.get(f"{kind}_reward"), None)
            pair[kind] = {"prompt": example["prompt"], "response": example[kind], "kind": kind,
                          "pair": len(pairs), "encoded": encoded[kind], "gold_reward": reward,
                          "first_error": first_error}
        pairs.append(pair)
    if stats.truncated:
        log.warning("qlogit: %d of %d responses cut at max_length=%d (%d pairs dropped)",
                    stats.truncated, stats.examples, max_length, len(examples) - len(pairs))
    if not pairs:
        raise ValueError(f"qlogit: no preference pairs to analyse (num_pairs={num_pairs}, max_length={max_length})")
    return pairs


def _gold_judge(source):
    """``judge(prompt, response) -> (reward, first_error)`` for the toy world, else None."""
    if not hasattr(source, "world_config"):
        return None
    from ibridge.world import judge

    def verdict(prompt, response):
        result = judge(prompt, response)
        return result.reward, result.first_error

    return verdict


# --------------------------------------------------------------------------- computation


@torch.no_grad()
def analyse(policy, reference, sequences: list[dict], beta: float, device, pad_id: int, batch_size: int = 32):
    """Per-sequence Q/V/rewards (see :func:`ibridge.analysis.qlogit.q_values`) and the identity errors.

    Returns ``(values, max_err_token, max_err_sequence)`` with ``values[i]`` a dict of lists
    (``q``, ``v``, ``token_reward``, ``r_t``) and floats (``reward``, ``v_start``, ``r_sum``).
    """
    policy.eval()
    reference.eval()
    vocab = int(policy.config.vocab_size)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]["input_ids"]))
    out: list[dict | None] = [None] * len(sequences)
    err_token = err_sequence = 0.0
    start = 0
    while start < len(order):
        longest = len(sequences[order[min(start + batch_size, len(order)) - 1]]["input_ids"])
        size = max(1, min(batch_size, MAX_BATCH_ELEMENTS // max(1, longest * vocab)))
        chunk = order[start : start + size]
        start += size
        batch = pad_sequences([sequences[i] for i in chunk], pad_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        vals = q_values(policy(**kwargs).logits, reference(**kwargs).logits, batch["labels"], beta)
        token_error, sequence_error = check_identities(vals)
        err_token, err_sequence = max(err_token, token_error), max(err_sequence, sequence_error)
        for row, index in enumerate(chunk):
            item = sequence_values(vals, row)
            item.update({key: float(vals[key][row]) for key in ("reward", "v_start", "r_sum")})
            out[index] = item
    return out, err_token, err_sequence


def _record(sequence: dict, values: dict, tokenizer) -> dict:
    """One line of tokens.jsonl."""
    encoded = sequence["encoded"]
    response_ids = [t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label != -100]
    first_error = sequence["first_error"]
    # The gold judge indexes whitespace-split response words; with the toy's word-level
    # tokenizer word i is response token i, and index len(words) is the closing EOS token.
    words = str(sequence["response"]).split()
    aligned = first_error is not None and len(response_ids) == len(words) + 1
    return {
        "pair": sequence["pair"],
        "kind": sequence["kind"],
        "prompt": sequence["prompt"],
        "response": sequence["response"],
        "tokens": tokenizer.convert_ids_to_tokens(response_ids),
        "token_text": [tokenizer.decode([t]) for t in response_ids],
        "token_reward": values["token_reward"],
        "q": values["q"],
        "v": values["v"],
        "r_t": values["r_t"],
        "sequence_reward": values["reward"],
        "v_start": values["v_start"],
        "sum_r_t": values["r_sum"],
        "gold_reward": sequence["gold_reward"],
        "first_error": first_error,
        "first_error_token": first_error if aligned else None,
    }


def summarise(records: list[dict], num_pairs: int, err_token: float, err_sequence: float, beta: float) -> dict:
    by_kind = {kind: [r for r in records if r["kind"] == kind] for kind in KINDS}
    chosen = np.array([r["sequence_reward"] for r in by_kind["chosen"]])
    rejected = np.array([r["sequence_reward"] for r in by_kind["rejected"]])
    first_errors = [r["first_error_token"] for r in records]
    auroc_reward, n_pos, n_neg = first_error_auroc([r["token_reward"] for r in records], first_errors)
    auroc_r_t, _, _ = first_error_auroc([r["r_t"] for r in records], first_errors)
    matched_reward, n_matched = position_matched_auroc([r["token_reward"] for r in records], first_errors)
    matched_r_t, _ = position_matched_auroc([r["r_t"] for r in records], first_errors)
    with_gold = [r for r in records if r["gold_reward"] is not None]
    rho = spearman([r["sequence_reward"] for r in with_gold], [r["gold_reward"] for r in with_gold])
    return {
        "identity_max_abs_error_token": err_token,
        "identity_max_abs_error_sequence": err_sequence,
        "auroc_token_reward": auroc_reward,
        "auroc_r_t": auroc_r_t,
        "auroc_position_only": position_only_auroc([len(r["token_reward"]) for r in records], first_errors),
        "auroc_token_reward_position_matched": matched_reward,
        "auroc_r_t_position_matched": matched_r_t,
        "num_position_matched_pairs": n_matched,
        "implicit_reward_acc": float(np.mean(preferences_from_scores(chosen, rejected))),
        "spearman_reward_gold": None if not np.isfinite(rho) else rho,
        "num_pairs": num_pairs,
        "num_sequences": len(records),
        "num_first_error_tokens": n_pos,
        "num_tokens_before_error": n_neg,
        "mean_reward_chosen": float(chosen.mean()),
        "mean_reward_rejected": float(rejected.mean()),
        "beta": beta,
    }


def _write_tokens(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------- figures


def _figure_pairs(records: list[dict], count: int) -> list[tuple[dict, dict]]:
    """``count`` pairs to show, preferring those whose rejected response goes wrong mid-way."""
    pairs: dict[int, dict] = {}
    for record in records:
        pairs.setdefault(record["pair"], {})[record["kind"]] = record
    ordered = [(p["chosen"], p["rejected"]) for _, p in sorted(pairs.items())]

    def informative(pair):
        first = pair[1]["first_error_token"]
        return first is not None and first > 0

    ordered.sort(key=lambda pair: not informative(pair))  # stable: keeps data order within groups
    return ordered[: max(0, count)]


def _gold_text(record: dict) -> str:
    return "" if record["gold_reward"] is None else f" · gold {record['gold_reward']:.2f}"


def draw_figures(records: list[dict], metrics: dict, out_dir: Path, num_figure_pairs: int) -> dict[str, Path]:
    """The three figures of the job, as PNG under ``out_dir``; returns {name: path}."""
    from ibridge.analysis import plots  # matplotlib only when drawing, not at CLI start-up

    paths = {}
    beta = metrics["beta"]

    shown = _figure_pairs(records, num_figure_pairs)
    if shown:
        rows = []
        for index, (chosen, rejected) in enumerate(shown):
            prompt = plots.shorten(chosen["prompt"], 34)
            for kind, record in (("chosen", chosen), ("rejected", rejected)):
                label = f"{prompt}\n{kind}{_gold_text(record)}" if kind == "chosen" else f"{kind}{_gold_text(record)}"
                rows.append({"label": label, "tokens": record["token_text"], "values": record["token_reward"],
                             "mark": record["first_error_token"], "separator": kind == "chosen" and index > 0})
        n_cols = min(32, max(len(r["tokens"]) for r in rows))
        fig, (ax,) = plots.new_figure(width=3.2 + 0.5 * n_cols, height=0.9 + 0.42 * len(rows))
        plots.plot_token_heatmap(fig, ax, rows, colorbar_label=f"β·log π/π_ref per token (β={beta:g})")
        ax.set_title("Per-token implicit reward (outlined: first wrong token, gold judge)", fontsize=10)
        paths["token_heatmap"] = plots.save_figure(fig, out_dir / "token_heatmap.png")

    groups = {kind: [r["sequence_reward"] for r in records if r["kind"] == kind] for kind in KINDS}
    with_gold = [r for r in records if r["gold_reward"] is not None]
    fig, axes = plots.new_figure(ncols=2 if with_gold else 1, width=5.0, height=3.8)
    plots.plot_histograms(axes[0], groups, xlabel=f"sequence implicit reward r(x, y)  (β={beta:g})")
    axes[0].set_title(f"Chosen vs rejected — implicit-reward accuracy {metrics['implicit_reward_acc']:.2f}",
                      fontsize=10)
    if with_gold:
        ax = axes[1]
        for index, kind in enumerate(KINDS):
            subset = [r for r in with_gold if r["kind"] == kind]
            ax.scatter([r["gold_reward"] for r in subset], [r["sequence_reward"] for r in subset], s=12,
                       alpha=0.6, color=plots.group_color(kind, index), label=kind, edgecolors="none")
        rho = metrics["spearman_reward_gold"]
        ax.set_title("Implicit vs gold reward — Spearman ρ " + ("n/a" if rho is None else f"{rho:.2f}"), fontsize=10)
        ax.set_xlabel("gold reward")
        ax.set_ylabel("sequence implicit reward r(x, y)")
        ax.legend(frameon=False, fontsize=9)
    paths["reward_distribution"] = plots.save_figure(fig, out_dir / "reward_distribution.png")

    fig, axes = plots.new_figure(ncols=2, width=4.8, height=3.6)
    for ax, key, label in ((axes[0], "q", "Q(s_t, a_t)"), (axes[1], "v", "V(s_t)")):
        series = {kind: [r[key] for r in records if r["kind"] == kind] for kind in KINDS}
        plots.plot_mean_by_position(ax, series, ylabel=label)
        ax.set_title(f"{label} by position (mean ± s.e., β={beta:g})", fontsize=10)
    paths["q_v_positions"] = plots.save_figure(fig, out_dir / "q_v_positions.png")
    return paths
