"""Shared parts of the benchmarks that compare ibridge with TRL and a bare PyTorch loop.

* `common`: memory readings, Hydra configs, the spec handed to every worker;
* `workers`: one configuration per subprocess (ibridge's stage, TRL's trainers, the bare
  loop, the correctness check), each printing one ``RESULT {...}`` line;
* `driver`: spawning workers (interleaved repeats), summaries, tables and target lines.

benchmarks/bench_trl.py (the toy model) and benchmarks/bench_scale.py (realistic shapes)
are two scripts over it.
"""
