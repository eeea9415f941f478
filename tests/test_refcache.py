"""The reference-log-prob cache: what its key covers, and the scoring pass behind it.

Hit or miss is observed through `load_reference`: it is called on a miss only.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch
import torch.nn.functional as F

import ibridge.fingerprint as fingerprint
import ibridge.packing as packing
from ibridge.distributed import DistInfo
from ibridge.models import load_model
from ibridge.refcache import cached_reference_logps, sequence_token_logps, token_budget_batches
from ibridge.runtime import Runtime

CPU_FP32 = Runtime(device=torch.device("cpu"), precision="fp32")
CPU_BF16 = Runtime(device=torch.device("cpu"), precision="bf16")
# The mode alone decides the dtype; one rank, so no process group is needed.
CPU_BF16_FSDP = Runtime(device=torch.device("cpu"), precision="bf16", dist=DistInfo(world_size=1, mode="fsdp"))
PAD = 0


def save_tiny_llama(folder, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=PAD, attn_implementation="eager")
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def make_sequences(seed: int = 0, n: int = 11) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 24, (1,), generator=gen))
        ids = torch.randint(1, 64, (length,), generator=gen).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=gen))
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


class Lookup:
    """cached_reference_logps with a loader that counts its calls (= cache misses)."""

    def __init__(self, cache_dir):
        self.cache_dir, self.loads = cache_dir, 0

    def __call__(self, folder, sequences, runtime):
        def load():
            self.loads += 1
            return load_model(folder, runtime)

        return cached_reference_logps(folder, sequences, runtime, PAD, self.cache_dir, load_reference=load)


def same_stamp(*files):
    for file in files:
        os.utime(file, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))


# ---------------------------------------------------------------- the key (issue 12, item 4)


def test_same_everything_hits_and_a_bf16_entry_is_a_miss_for_fp32(tiny, tmp_path):
    lookup, sequences = Lookup(tmp_path / "cache"), make_sequences()
    bf16 = lookup(tiny, sequences, CPU_BF16)
    assert lookup.loads == 1
    fp32 = lookup(tiny, sequences, CPU_FP32)
    assert lookup.loads == 2, "fp32 was served the bf16 entry"
    again = lookup(tiny, sequences, CPU_FP32)
    assert lookup.loads == 2, "same model, tokens and numerics must hit"
    for a, b in zip(fp32, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(fp32, bf16, strict=True))


def test_attention_implementation_is_part_of_the_key(tiny, tmp_path):
    lookup, sequences = Lookup(tmp_path / "cache"), make_sequences()
    lookup(tiny, sequences, CPU_FP32)
    lookup(tiny, sequences, Runtime(device=torch.device("cpu"), precision="fp32", attn_implementation="sdpa"))
    assert lookup.loads == 2


def test_a_changed_token_is_a_miss(tiny, tmp_path):
    lookup, sequences = Lookup(tmp_path / "cache"), make_sequences()
    lookup(tiny, sequences, CPU_FP32)
    changed = [dict(seq) for seq in sequences]
    changed[3] = {"input_ids": [*changed[3]["input_ids"][:-1], 7 if changed[3]["input_ids"][-1] != 7 else 8],
                  "labels": changed[3]["labels"]}
    lookup(tiny, changed, CPU_FP32)
    assert lookup.loads == 2


@pytest.mark.parametrize("limit", [fingerprint.FULL_HASH_LIMIT, 0], ids=["hashed-whole", "over-limit-sidecar"])
def test_two_folders_with_other_weights_same_size_and_mtime_are_a_miss(tmp_path, monkeypatch, limit):
    # limit=0 treats the tiny shards as the multi-GB ones, once fingerprinted by size and mtime only.
    monkeypatch.setattr(fingerprint, "FULL_HASH_LIMIT", limit)
    a = save_tiny_llama(tmp_path / "a", seed=1)
    b = save_tiny_llama(tmp_path / "b", seed=2)
    weights = [a / "model.safetensors", b / "model.safetensors"]
    assert weights[0].stat().st_size == weights[1].stat().st_size
    same_stamp(*weights, a / "config.json", b / "config.json")
    lookup, sequences = Lookup(tmp_path / "cache"), make_sequences()
    from_a = lookup(a, sequences, CPU_FP32)
    from_b = lookup(b, sequences, CPU_FP32)
    assert lookup.loads == 2, "folder b was served folder a's log-probs"
    assert any(not torch.allclose(x, y) for x, y in zip(from_a, from_b, strict=True))


def test_weights_rewritten_in_place_with_the_old_mtime_are_a_miss(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "FULL_HASH_LIMIT", 0)
    a = save_tiny_llama(tmp_path / "a", seed=1)
    b = save_tiny_llama(tmp_path / "b", seed=2)
    same_stamp(a / "model.safetensors")
    lookup, sequences = Lookup(tmp_path / "cache"), make_sequences()
    lookup(a, sequences, CPU_FP32)
    time.sleep(0.05)  # past the file system's timestamp granularity
    shutil.copyfile(b / "model.safetensors", a / "model.safetensors")  # same inode, same size
    same_stamp(a / "model.safetensors")
    lookup(a, sequences, CPU_FP32)
    assert lookup.loads == 2


def test_a_large_file_is_hashed_once_and_the_digest_kept_beside_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "FULL_HASH_LIMIT", 0)
    folder = save_tiny_llama(tmp_path / "m", seed=1)
    hashed = []
    real_sha = fingerprint._sha256
    monkeypatch.setattr(fingerprint, "_sha256", lambda f: hashed.append(f.name) or real_sha(f))
    first = fingerprint.model_fingerprint(folder, tmp_path / "cache")
    assert (folder / ("model.safetensors" + fingerprint.SIDECAR_SUFFIX)).is_file()
    assert fingerprint.model_fingerprint(folder, tmp_path / "cache") == first
    assert hashed.count("model.safetensors") == 1
    import hashlib

    expected = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert fingerprint.content_hash(folder / "model.safetensors") == expected


def test_a_read_only_model_folder_keeps_the_digest_in_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "FULL_HASH_LIMIT", 0)
    folder = save_tiny_llama(tmp_path / "m", seed=1)
    real_write = fingerprint.write_json_atomic

    def read_only_model_folder(path, payload):  # chmod does not stop root, so refuse here
        if path.parent == folder:
            raise PermissionError(f"{path}: read-only file system")
        real_write(path, payload)

    monkeypatch.setattr(fingerprint, "write_json_atomic", read_only_model_folder)
    lookup, sequences = Lookup(tmp_path / "cache"), make_sequences()
    lookup(folder, sequences, CPU_FP32)
    lookup(folder, sequences, CPU_FP32)
    assert lookup.loads == 1
    assert not list(folder.glob("*" + fingerprint.SIDECAR_SUFFIX))
    assert len(list((tmp_path / "cache" / "reflogps" / "hashes").glob("*.json"))) == 2  # weights, config


def test_symlinked_weights_keep_their_digest_out_of_the_linked_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "FULL_HASH_LIMIT", 0)
    blobs = save_tiny_llama(tmp_path / "blobs", seed=1)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for file in blobs.iterdir():
        (snapshot / file.name).symlink_to(file)
    first = fingerprint.model_fingerprint(snapshot, tmp_path / "cache")
    assert not list(snapshot.glob("*" + fingerprint.SIDECAR_SUFFIX))
    assert fingerprint.model_fingerprint(snapshot, tmp_path / "cache") == first


def test_a_hub_name_is_keyed_by_its_resolved_revision(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    hub = tmp_path / "hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub))
    repo = hub / "models--org--tiny"
    weights = save_tiny_llama(tmp_path / "weights", seed=1)
    for commit in ("a" * 40, "b" * 40):  # the same files under two revisions
        shutil.copytree(weights, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    prints = []
    for commit in ("a" * 40, "b" * 40):
        (repo / "refs" / "main").write_text(commit)
        prints.append(fingerprint.model_fingerprint("org/tiny", tmp_path / "cache"))
    assert None not in prints and prints[0] != prints[1]
    assert fingerprint.model_fingerprint("org/not-downloaded", tmp_path / "cache") is None


# ---------------------------------------------------------------- the scoring pass (issue 14, item 6)


def independent_logps(model, seq) -> torch.Tensor:
    """One sequence, no padding, the textbook log_softmax: (len - 1,), 0.0 where unscored."""
    ids = torch.tensor([seq["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()  # (T-1, V)
    labels = torch.tensor(seq["labels"][1:])
    logps = F.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels != -100, logps, torch.zeros_like(logps))


def test_token_budget_batches_bound_padded_tokens_and_cover_every_sequence():
    lengths = [5, 17, 3, 17, 9, 40, 1, 8, 8]
    batches = token_budget_batches(lengths, 34)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= 34 or len(batch) == 1
    assert batches[0] == [5]  # 40 > 34 goes alone, and first
    assert [lengths[i] for i in batches[1]] == [17, 17]
    with pytest.raises(ValueError, match="max_tokens"):
        token_budget_batches(lengths, 0)


@pytest.mark.parametrize("max_tokens", [1, 40, 10**6])
def test_token_batched_pass_equals_unbatched_scoring(tiny, max_tokens):
    model = load_model(tiny, CPU_FP32)
    sequences = make_sequences(seed=3)
    got = sequence_token_logps(model, sequences, CPU_FP32, PAD, max_tokens=max_tokens)
    for value, seq in zip(got, sequences, strict=True):
        assert value.dtype == torch.float32 and value.shape == (len(seq["input_ids"]) - 1,)
        torch.testing.assert_close(value, independent_logps(model, seq), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunked_head", [False, True])
def test_scoring_builds_logits_at_labelled_tokens_only_and_equals_textbook(tiny, monkeypatch, chunked_head):
    # Issue 16: at a 128k vocabulary the padded (B, T, V) logits of this pass were most of the
    # DPO stage's peak memory. The pass now scores like the training loop: logits (or the
    # chunked head) at labelled positions only. The padded pass had B x T logit rows.
    if chunked_head:
        monkeypatch.setattr(packing, "FUSED_HEAD_BYTES", 0)  # every batch through ibridge/lmhead.py
    model = load_model(tiny, CPU_FP32)
    sequences = make_sequences(seed=4)
    logit_rows, every_layer = [], []
    model.register_forward_hook(
        lambda mod, args, kwargs, out: logit_rows.append(out.logits.shape[:-1].numel()), with_kwargs=True)
    model.register_forward_pre_hook(
        lambda mod, args, kwargs: every_layer.append(bool(kwargs.get("output_hidden_states"))), with_kwargs=True)
    got = sequence_token_logps(model, sequences, CPU_FP32, PAD, max_tokens=10**6)
    labelled = sum(label != -100 for seq in sequences for label in seq["labels"][1:])
    assert logit_rows and sum(logit_rows) <= labelled
    # The chunked head reads the decoder's last hidden states (packing.final_hidden_states), not
    # every layer's: in a no-grad pass those would be held for nothing (L + 1 x T x H).
    assert not any(every_layer)
    for value, seq in zip(got, sequences, strict=True):
        torch.testing.assert_close(value, independent_logps(model, seq), rtol=1e-5, atol=1e-5)


def test_scoring_builds_no_kv_cache(tiny):
    model = load_model(tiny, CPU_FP32)
    seen = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs.get("use_cache")),
                                    with_kwargs=True)
    sequence_token_logps(model, make_sequences(), CPU_FP32, PAD, max_tokens=64)
    assert seen and all(flag is False for flag in seen)


def test_inference_load_is_in_the_compute_dtype_and_training_load_stays_fp32(tiny):
    inference = load_model(tiny, CPU_BF16, for_inference=True)
    assert {p.dtype for p in inference.parameters()} == {torch.bfloat16}
    assert not inference.training and not any(p.requires_grad for p in inference.parameters())
    assert {p.dtype for p in load_model(tiny, CPU_BF16).parameters()} == {torch.float32}
    assert {p.dtype for p in load_model(tiny, CPU_FP32, for_inference=True).parameters()} == {torch.float32}


def test_bf16_parameter_training_gets_a_reference_pass_on_bf16_weights(tiny, tmp_path):
    # FSDP's bf16 parameter policy (and DeepSpeed bf16) train on bf16 parameters.
    from transformers import AutoModelForCausalLM

    sequences = make_sequences(seed=4)
    got = cached_reference_logps(tiny, sequences, CPU_BF16_FSDP, PAD, tmp_path / "cache")
    bf16 = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16, attn_implementation="eager")
    for value, seq in zip(got, sequences, strict=True):
        torch.testing.assert_close(value, independent_logps(bf16, seq), rtol=0, atol=1e-6)


def test_autocast_training_gets_a_reference_equal_to_its_own_step_zero_forward(tiny, tmp_path):
    # One process (or DDP) under precision=bf16 trains with autocast over fp32 weights: the
    # reference pass must run the same numerics, so that the implicit reward of the untrained
    # policy is exactly zero (issue 14, item 9). A bf16-weight reference is off by ~1e-2.
    from ibridge.data.collate import collate_demonstrations
    from ibridge.objectives.logprobs import token_logps

    sequences = make_sequences(seed=5)
    reference = cached_reference_logps(tiny, sequences, CPU_BF16, PAD, tmp_path / "cache")
    policy = load_model(tiny, CPU_BF16)  # what a stage trains: fp32 weights
    batch = collate_demonstrations(sequences, PAD)
    with torch.no_grad(), CPU_BF16.autocast():
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    policy_logps, mask = token_logps(logits, batch["labels"])
    for row, (value, seq) in enumerate(zip(reference, sequences, strict=True)):
        n = len(seq["input_ids"]) - 1
        implicit = torch.where(mask[row, :n], policy_logps[row, :n] - value, torch.zeros(n))
        assert float(implicit.abs().max()) <= 1e-6, f"sequence {row}: implicit reward {implicit} at step 0"
