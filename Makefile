# ibridge — common tasks. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch unless the machine has a GPU (a bare `torch` pulls a multi-GB CUDA build).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: help setup setup-deepspeed run smoke test test-fast lint bench-objectives bench-trl bench-scale gpu-check measure reproduce clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(BIN)/ibridge: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

setup: $(BIN)/ibridge  ## create .venv and install ibridge with its dev tools

# DeepSpeed's source package imports torch to build, so it installs without build
# isolation, after torch (a build-isolated install would pull a CUDA torch).
$(VENV)/.deepspeed: $(BIN)/ibridge
	$(BIN)/pip install -q setuptools wheel
	$(BIN)/pip install -q --no-build-isolation -e ".[deepspeed]"
	@touch $@

setup-deepspeed: $(VENV)/.deepspeed  ## add the optional DeepSpeed backend (trainer=deepspeed)

run: setup  ## run the default pipeline (base -> SFT -> DPO -> eval) on the toy world
	$(BIN)/ibridge

smoke: setup  ## a one-to-two-minute pipeline on a tiny world and model
	$(BIN)/ibridge debug=smoke

test: setup $(VENV)/.deepspeed  ## every test, on 2 processes (what CI runs; installs the DeepSpeed extra to test it)
	$(BIN)/python -m pytest -q -n 2

test-fast: setup  ## the fast tier: maths, configs, data, one smoke pipeline (no kill/resume, sweep or DDP runs)
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

lint: setup  ## ruff
	$(BIN)/ruff check ibridge tests benchmarks

measure: setup  ## the default pipeline over seeds 0,1,2, then the per-stage gold-reward table
	$(BIN)/ibridge -m seed=0,1,2 hydra.sweep.dir=multirun/measure-default
	$(BIN)/python -m ibridge.analysis.stage_table multirun/measure-default

clean:  ## remove run outputs (not the model cache)
	rm -rf outputs multirun/*/ .pytest_cache

bench-objectives: setup  ## steps/s of every f-divergence objective relative to sft (warm reference cache)
	$(BIN)/python benchmarks/bench_objectives.py --granularity sequence
	$(BIN)/python benchmarks/bench_objectives.py --granularity token

$(VENV)/.bench: $(BIN)/ibridge
	$(BIN)/pip install -q -e ".[bench]"
	@touch $@

bench-trl: $(VENV)/.bench  ## ibridge vs TRL (DPO, SFT) and a bare loop: tok/s, memory, correctness (~8 min; BENCHMARKS.md)
	$(BIN)/python benchmarks/bench_trl.py

bench-scale: $(VENV)/.bench  ## the same at realistic shapes: 128k vocabulary, UltraChat-like lengths (~10 min; BENCHMARKS.md)
	$(BIN)/python benchmarks/bench_scale.py

gpu-check: setup  ## bf16 steps, bf16/fp32 loss parity, memory, resume, NCCL on a CUDA machine (--cpu: the CPU mode CI runs)
	$(BIN)/python benchmarks/gpu_check.py

REPRO_DIR ?= multirun/reproduce
reproduce: setup  ## both grids on the toy world, 3 base models x 3 seeds each, then the reports (~20 min on 2 cores)
	$(BIN)/ibridge -m grid=lr model.pretrain.seed=null,1,2 hydra.sweep.dir=$(REPRO_DIR)/lr
	$(BIN)/ibridge report report.path=$(REPRO_DIR)/lr logger=none
	$(BIN)/ibridge -m grid=divergence model.pretrain.seed=null,1,2 hydra.sweep.dir=$(REPRO_DIR)/divergence
	$(BIN)/ibridge report report.path=$(REPRO_DIR)/divergence logger=none
