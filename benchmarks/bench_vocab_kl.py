"""Memory and time of the vocabulary KL that `sft_kl` and `asft` anchor with (docs/objectives.md).

    python benchmarks/bench_vocab_kl.py [--positions 512] [--vocab 128256]

Two sequences of `--positions` bf16 logits each (a quarter of them prompt, not scored), at a
Llama-3-sized vocabulary by default: `ibridge.objectives.vocab_kl` (float32 chunks, scored
rows only) against the textbook ``F.kl_div(F.log_softmax(x.float()), ...)``. Prints what
autograd keeps for the backward pass beyond the policy logits themselves (the reference
logits are dropped by the caller after the step's forward), and forward + backward time.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ibridge.objectives import vocab_kl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (2, args.positions, args.vocab)
    logits = torch.randn(shape).to(torch.bfloat16).requires_grad_(True)
    ref = torch.randn(shape).to(torch.bfloat16)
    where = torch.ones(shape[:2], dtype=torch.bool)
    where[:, : args.positions // 4] = False  # the prompt

    def textbook():
        logp = F.log_softmax(logits.float(), -1)
        logq = F.log_softmax(ref.float(), -1)
        kl = F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)
        return torch.where(where, kl, torch.zeros_like(kl))

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, logits {shape} bf16 "
          f"({logits.numel() * 2 / 2**20:.0f} MiB), {int(where.sum())} scored positions")
    for name, fn in (("vocab_kl", lambda: vocab_kl(logits, ref, where)), ("F.kl_div", textbook)):
        kept: dict = {}

        def pack(t, kept=kept):
            kept[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
            return t

        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        out.sum().backward()
        seconds = time.perf_counter() - start
        logits.grad = None
        extra = sum(size for (ptr, *_), size in kept.items() if ptr != logits.data_ptr())
        print(f"{name:9s} kept for backward beyond the logits: {extra / 2**20:7.1f} MiB; forward + backward {seconds:5.2f} s")


if __name__ == "__main__":
    main()
