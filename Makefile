# ibridge — common tasks. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch unless the machine has a GPU (a bare `torch` pulls a multi-GB CUDA build).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: help setup setup-deepspeed run smoke test test-fast test-slurm lint bench-objectives bench-trl bench-scale gpu-check measure \
	reproduce reproduce-forgetting reproduce-default reproduce-lr reproduce-objectives reproduce-beta reproduce-divergence reproduce-length reproduce-forgetting-length reproduce-optimiser \
	reproduce-dpo-strength clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(BIN)/ibridge: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

setup: $(BIN)/ibridge  ## create .venv and install ibridge with its dev tools
	@echo "ibridge is installed in $(VENV). Next: source $(VENV)/bin/activate && ibridge debug=smoke"
	@echo "(or without activating: $(BIN)/ibridge debug=smoke; tab completion: eval \"\$$(ibridge -sc install=bash)\")"

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

# --dist loadgroup: the tests/slurm cells share their fixtures on one worker (xdist_group "slurm").
test: setup $(VENV)/.deepspeed  ## every test, on 2 processes (what CI runs; installs the DeepSpeed extra to test it; tests/slurm skip without tests/slurm/up.sh's Slurm)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

test-fast: setup  ## the fast tier: maths, configs, data, one smoke pipeline (no kill/resume, sweep or DDP runs)
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

test-slurm: setup  ## bring up a one-node Slurm here (tests/slurm/up.sh: root, apt-get), run tests/slurm on it, stop it
	bash tests/slurm/up.sh
	$(BIN)/python -m pytest -q tests/slurm -p no:cacheprovider; status=$$?; bash tests/slurm/down.sh; exit $$status

lint: setup  ## ruff
	$(BIN)/ruff check ibridge tests benchmarks hydra_plugins

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

gpu-check: setup  ## on one or more GPUs: bf16 steps and parity, resume, kl/token, eval scoring, LoRA merge, FSDP2, NCCL (JSON: gpu_check.json)
	$(BIN)/python benchmarks/gpu_check.py --json gpu_check.json

REPRO_DIR ?= multirun/reproduce
# `make reproduce` (REPRODUCTION.md): the headline comparisons, each on REPRO_BASES toy base models
# (model.pretrain.seed null,1,..; null is the world's seed 0, so 0 is never used beside it) with
# one seed each: a seed costs what a base costs, and only a new base narrows the interval over
# bases. docs/reproduction/power.py derives the number from the last run's per-base spread and
# estimates the time (REPRO_BASES=12: about 53 min on 2 cores, bases built on the way). One thread
# per cell, no wandb, two cells at a time (joblib). REPRO_EXTRA adds overrides to every cell
# (debug=smoke: the end-to-end test of these commands, tests/test_reproduce_script.py), and
# REPRO_FORGETTING names the forgetting world's objectives at lr 1e-3.
REPRO_BASES ?= 12
REPRO_EXTRA ?=
REPRO_FORGETTING ?= sft,jsd,chi2,hellinger,rkl,sft_kl,asft,dft,prior_leaning
REPRO_SEEDS := null$(shell seq -s '' -f ',%g' 1 $$(( $(REPRO_BASES) - 1 )))
HEAD := model.pretrain.seed=$(REPRO_SEEDS) seed=0 trainer.num_threads=1 logger=none hydra/launcher=parallel $(REPRO_EXTRA)
# The older grids (each its own target below, not in `make reproduce`): 3 bases, seeds as listed.
BASES := model.pretrain.seed=null,1,2
CELL := $(BASES) trainer.num_threads=1 logger=none hydra/launcher=parallel
SGD_LR ?= 0.3
GRIDS := forgetting default
reproduce: setup  ## the headline comparisons on REPRO_BASES bases, reports, paired effects; prints the total time (budget 60 min on 2 cores)
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory $(addprefix reproduce-,$(GRIDS)) || exit 1; \
	$(BIN)/python docs/reproduction/question.py $(REPRO_DIR) > $(REPRO_DIR)/question.md || exit 1; \
	echo "make reproduce: $(words $(GRIDS)) grids x $(REPRO_BASES) bases in $$(( $$(date +%s) - start )) s; paired effects in $(REPRO_DIR)/question.md"
reproduce-forgetting: setup  ## world=forgetting, 8 SFT epochs: sft lr 1e-3 and 3e-4, jsd, chi2, hellinger, rkl, sft_kl, asft, dft, prior_leaning (10 x REPRO_BASES pipelines)
	$(BIN)/ibridge -m world=forgetting sft.epochs=8 objective=$(REPRO_FORGETTING) lr=1e-3 $(HEAD) hydra.sweep.dir=$(REPRO_DIR)/forgetting
	$(BIN)/ibridge -m world=forgetting sft.epochs=8 objective=sft lr=3e-4 $(HEAD) hydra.sweep.dir=$(REPRO_DIR)/forgetting
	$(BIN)/ibridge report report.path=$(REPRO_DIR)/forgetting logger=none
reproduce-default: setup  ## default world, 2 SFT epochs: sft lr 1e-3 and 3e-4, jsd, tv; sft and tv without clipping (6 x REPRO_BASES pipelines)
	$(BIN)/ibridge -m objective=sft,jsd,tv lr=1e-3 $(HEAD) hydra.sweep.dir=$(REPRO_DIR)/default
	$(BIN)/ibridge -m objective=sft lr=3e-4 $(HEAD) hydra.sweep.dir=$(REPRO_DIR)/default
	$(BIN)/ibridge -m objective=sft,tv lr=1e-3 sft.max_grad_norm=1e9 $(HEAD) hydra.sweep.dir=$(REPRO_DIR)/default
	$(BIN)/ibridge report report.path=$(REPRO_DIR)/default logger=none
reproduce-lr: setup  ## (older grid) the paper's grid: SFT lr 1e-3..3e-5, 3 bases x 3 seeds (36 pipelines)
	$(BIN)/ibridge -m grid=lr $(CELL) hydra.sweep.dir=$(REPRO_DIR)/lr
	$(BIN)/ibridge report report.path=$(REPRO_DIR)/lr logger=none
reproduce-objectives: setup  ## (older grid) sft, tv, the f-divergences, dft, prior_leaning, sft_kl, asft: 3 bases x 3 seeds (90 pipelines)
	$(BIN)/ibridge -m grid=objectives $(CELL) hydra.sweep.dir=$(REPRO_DIR)/objectives
	$(BIN)/ibridge report report.path=$(REPRO_DIR)/objectives logger=none
reproduce-beta: setup  ## (older grid) tv, chi2, jsd at beta 0.01, 0.1, 1: 3 bases x seed 0 (27 pipelines)
	$(BIN)/ibridge -m grid=beta objective=tv,chi2,jsd seed=0 $(CELL) hydra.sweep.dir=$(REPRO_DIR)/beta
	$(BIN)/ibridge report report.path=$(REPRO_DIR)/beta logger=none
reproduce-divergence: setup  ## (older grid) the paper's divergence grid alone (inside reproduce-objectives): 3 bases x 3 seeds (45 pipelines)
	$(BIN)/ibridge -m grid=divergence $(CELL) hydra.sweep.dir=$(REPRO_DIR)/divergence
	$(BIN)/ibridge report report.path=$(REPRO_DIR)/divergence logger=none
reproduce-length: setup  ## (older grid) default world: sft 1e-3 at 2 and 8 SFT epochs, 3e-4 at 8; jsd, tv at 2 epochs; jsd at 8 (33 pipelines)
	$(BIN)/ibridge -m objective=sft lr=1e-3 sft.epochs=2,8 seed=0,1 $(CELL) hydra.sweep.dir=$(REPRO_DIR)/length
	$(BIN)/ibridge -m objective=sft lr=3e-4 sft.epochs=8 seed=0,1 $(CELL) hydra.sweep.dir=$(REPRO_DIR)/length
	$(BIN)/ibridge -m objective=jsd,tv lr=1e-3 sft.epochs=2 seed=0,1 $(CELL) hydra.sweep.dir=$(REPRO_DIR)/length
	$(BIN)/ibridge -m objective=jsd lr=1e-3 sft.epochs=8 seed=0 $(CELL) hydra.sweep.dir=$(REPRO_DIR)/length
	$(BIN)/ibridge report report.path=$(REPRO_DIR)/length logger=none
reproduce-forgetting-length: setup  ## (older grid) world=forgetting: sft 1e-3/3e-4 x 2/8 epochs; jsd, sft_kl, asft at 8 epochs, 3 bases x 2 seeds (42 pipelines)
	$(BIN)/ibridge -m world=forgetting objective=sft lr=1e-3,3e-4 sft.epochs=2,8 seed=0,1 $(CELL) hydra.sweep.dir=$(REPRO_DIR)/forgetting-length
	$(BIN)/ibridge -m world=forgetting objective=jsd,sft_kl,asft lr=1e-3 sft.epochs=8 seed=0,1 $(CELL) hydra.sweep.dir=$(REPRO_DIR)/forgetting-length
	$(BIN)/ibridge report report.path=$(REPRO_DIR)/forgetting-length logger=none
reproduce-optimiser: setup  ## (older grid) AdamW without clipping (sft, jsd) and plain SGD (sft, tv, jsd at SGD_LR) (30 pipelines)
	$(BIN)/ibridge -m objective=sft,jsd lr=1e-3 sft.optimizer=adamw sft.max_grad_norm=1e9 seed=0,1 $(CELL) hydra.sweep.dir=$(REPRO_DIR)/optimiser
	$(BIN)/ibridge -m objective=sft,tv,jsd lr=$(SGD_LR) sft.optimizer=sgd sft.max_grad_norm=1e9 seed=0,1 $(CELL) hydra.sweep.dir=$(REPRO_DIR)/optimiser
	$(BIN)/ibridge report report.path=$(REPRO_DIR)/optimiser logger=none
reproduce-dpo-strength: setup  ## (older grid) world=forgetting: sft lr 1e-3 vs 3e-4 under a weaker and a stronger DPO (dpo.lr 1.5e-4, 1.5e-3), seed 0 (12 pipelines)
	$(BIN)/ibridge -m world=forgetting objective=sft lr=1e-3,3e-4 dpo.lr=1.5e-4,1.5e-3 seed=0 $(CELL) hydra.sweep.dir=$(REPRO_DIR)/dpo-strength
	$(BIN)/ibridge report report.path=$(REPRO_DIR)/dpo-strength logger=none
