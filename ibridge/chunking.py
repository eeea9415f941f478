"""Row chunks for (rows, V) temporaries whose size should not grow with the vocabulary.

Used by every loop that runs a softmax over the vocabulary a few rows at a time (the
log-prob kernels of ibridge/objectives/logprobs.py, the chunked LM head of ibridge/lmhead.py,
the vocabulary KL of ibridge/objectives/vocab_divergence.py, `kl/token` in
ibridge/evaluation/drift.py). Each keeps its own element budget, so its memory can be set
(and, in tests, shrunk) alone.
"""

from __future__ import annotations

from collections.abc import Iterator


def row_chunks(n_rows: int, vocab: int, elements: int) -> Iterator[slice]:
    """Consecutive slices covering ``range(n_rows)``, each of at most ``max(1, elements // vocab)``
    rows: a (rows, V) temporary of one chunk holds about `elements` values whatever V is."""
    step = max(1, elements // max(vocab, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))
