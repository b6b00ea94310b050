# micro_diffusion: every target sets up what it needs (make install is idempotent and quick when done).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
export MPLCONFIGDIR ?= $(CURDIR)/.venv/.mplconfig
export HF_HUB_OFFLINE ?= 1

.PHONY: install test test-fast browser lint demo report bench gpu-check experiment ablation ablation-arch sizes families routing

install: $(STAMP)

# The stamp depends on the lock and the project file: a changed lock reinstalls, an unchanged one is a no-op.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

# make test-fast: the unit tests, without the end-to-end chains marked slow (trainings, make targets, subprocesses):
# about a minute on 2 cores. make test (CI) runs that selection first, then the slow chains: nothing runs twice.
test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

test: test-fast browser
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS) tests

# The serve page's browser test drives Debian's Chromium through Debian's ChromeDriver: installed here when missing and
# this is root on Debian (CI, a fresh machine); elsewhere the test is skipped and says why (it fails on CI).
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "make browser: Debian's chromium and chromium-driver are missing and this is not root: the serve page's \
	browser test will be skipped (sudo apt-get install chromium chromium-driver)" >&2; fi

lint: install
	$(PY) -m ruff check micro_diffusion data_prep tests benchmarks scripts

# make report RUN="runs/stage1 runs/stage2" [OUT=report.html]: the cost dashboard of one or more run folders.
report: install
	@test -n "$(RUN)" || { echo 'make report: give the run folder(s), e.g. make report RUN=runs/s1_256_masked' >&2; exit 2; }
	$(VENV)/bin/micro-diffusion cost report $(RUN) $(if $(OUT),--out $(OUT))

# Training stages through Composer's launcher: NGPUS processes on this node; NNODES > 1 adds the multi-node flags
# (every node runs the same command with its own NODE_RANK and the same MASTER_ADDR/MASTER_PORT).
# DRY_RUN=1 prints each stage's resolved recipe and run plan instead of training (CI runs them so).
NGPUS ?= 8
NNODES ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?=
MASTER_PORT ?=
DATA_ROOT ?= data/latents
RUNS_ROOT ?= runs
TRAIN_ARGS ?=
DRY_RUN ?=
LAUNCH = $(VENV)/bin/composer -n $(NGPUS) --world_size $$(( $(NGPUS) * $(NNODES) )) --node_rank $(NODE_RANK) \
	$(if $(MASTER_ADDR),--master_addr $(MASTER_ADDR)) $(if $(MASTER_PORT),--master_port $(MASTER_PORT))
train_stage = $(LAUNCH) -m micro_diffusion.cli train recipes/$(1).yaml data.root=$(DATA_ROOT) runs_root=$(RUNS_ROOT) \
	$(TRAIN_ARGS) $(if $(DRY_RUN),--dry-run)

.PHONY: train-256-masked train-256-finetune train-512-masked train-512-finetune train-all
train-256-masked: install
	$(call train_stage,res256_masked)
train-256-finetune: install
	$(call train_stage,res256_finetune)
train-512-masked: install
	$(call train_stage,res512_masked)
train-512-finetune: install
	$(call train_stage,res512_finetune)
# The four stages in order, each starting from the previous one's latest checkpoint (install is done once, here).
train-all: install
	$(MAKE) -o install train-256-masked
	$(MAKE) -o install train-256-finetune
	$(MAKE) -o install train-512-masked
	$(MAKE) -o install train-512-finetune

# make eval-coco CKPT=runs/res512_finetune: zero-shot FID/KID/CLIP score on 30k COCO-2014 val captions. CKPT is a run
# folder, a checkpoint or an exported model; a run or checkpoint is exported first (into EVAL_OUT/model). Generation
# is sharded over NGPUS processes and resumes where it stopped. DRY_RUN=1 prints the resolved settings (CI runs it so).
COCO ?= data/coco
EVAL_OUT ?= eval/coco
EVAL_ARGS ?=
.PHONY: eval-coco
eval-coco: install
	@test -n "$(CKPT)" || { echo 'make eval-coco: give CKPT=<run folder, checkpoint or exported model>' >&2; exit 2; }
	m="$(CKPT)"; if [ -z "$(DRY_RUN)" ] && [ ! -f "$(CKPT)/model.safetensors" ]; then \
	  $(PY) -m micro_diffusion.cli export "$(CKPT)" --out "$(EVAL_OUT)/model" && m="$(EVAL_OUT)/model"; fi; \
	$(if $(DRY_RUN),$(PY),$(LAUNCH)) -m micro_diffusion.cli eval coco "$$m" --out "$(EVAL_OUT)" \
	  --annotations $(COCO)/annotations/captions_val2014.json --images $(COCO)/val2014 $(EVAL_ARGS) \
	  $(if $(DRY_RUN),--dry-run)

# Benchmarks (not tests): JSON and a markdown table (summary.md) in BENCH_OUT. QUICK=1 runs every benchmark at
# tiny size into *_quick.json files: it checks the harness, not the speed (CI runs it so, into a temp folder).
QUICK ?=
BENCH_OUT ?= benchmarks/results
bench: install
	$(PY) -m benchmarks.bench_train --out $(BENCH_OUT) $(if $(QUICK),--quick)
	$(PY) -m benchmarks.bench_sample --out $(BENCH_OUT) $(if $(QUICK),--quick)
	$(PY) -m benchmarks.bench_data --out $(BENCH_OUT) $(if $(QUICK),--quick --samples 64 --images 8 --workers 0)
	$(PY) -m benchmarks.bench_convert --out $(BENCH_OUT) $(if $(QUICK),--quick --images 8)
	$(PY) -m benchmarks.bench_compose --out $(BENCH_OUT) $(if $(QUICK),--quick --scenes 16)
	$(PY) -m benchmarks.bench_checkpointing --out $(BENCH_OUT) $(if $(QUICK),--quick)
	$(if $(QUICK),,$(PY) -m benchmarks.report --out $(BENCH_OUT))

# Qualify a rented GPU box before installing anything: the system python with torch, numpy and PyYAML (no Composer,
# no Streaming, no `make install`). In at most about 4 minutes: the recipes' XL steps at their microbatches, attention,
# MoE, torch.compile and guided sampling, into GPU_CHECK_OUT/gpu_check.json and gpu_check.md. Without CUDA it runs at
# a tiny size (CI runs it so). GPU_CHECK_ARGS passes more options (e.g. --budget 120).
GPU_CHECK_PY ?= python3
GPU_CHECK_OUT ?= runs/gpu_check
GPU_CHECK_ARGS ?=
gpu-check:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_CHECK_PY) -m benchmarks.gpu_check --out $(GPU_CHECK_OUT) \
		$(GPU_CHECK_ARGS)

# The whole pipeline on CPU on the embedded shapes dataset, under runs/demo/; FRESH=1 starts over;
# QUICK=1 runs every step at a tiny size (CI runs it so); DRY_RUN=1 prints the plan; DEMO_ROOT=DIR writes elsewhere.
DEMO_ROOT ?= runs/demo
demo: install
	$(VENV)/bin/micro-diffusion demo --out $(DEMO_ROOT) $(if $(FRESH),--fresh) $(if $(QUICK),--quick) \
		$(if $(DRY_RUN),--dry-run)

# Equal-compute experiments on CPU (recipes/experiments/NAME.yaml): every variant trained, evaluated, its claims
# judged; a killed run resumes on the next call. make experiment NAME=masking [QUICK=1] [DRY_RUN=1] [SEEDS="0 1"]
# [EXP_OUT=DIR]. QUICK=1: the whole chain at a toy size (CI runs it so); DRY_RUN=1 prints the plan; SEEDS overrides
# the file's seeds; EXP_OUT=DIR writes into DIR/NAME (default runs/experiments/NAME).
NAME ?=
SEEDS ?=
EXP_OUT ?=
experiment: install
	@test -n "$(NAME)" || { echo 'make experiment: give NAME, e.g. make experiment NAME=masking (recipes/experiments/)' >&2; exit 2; }
	$(VENV)/bin/micro-diffusion experiment recipes/experiments/$(NAME).yaml $(if $(QUICK),--quick) \
		$(if $(DRY_RUN),--dry-run) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(EXP_OUT),--out $(EXP_OUT)/$(NAME))

# The experiments by their old names: masking, architecture, and sampling efficiency across four model sizes
# (each sampled on a grid of samplers x steps x guidance scales, quality against sampling FLOPs per image).
ablation: install
	$(MAKE) -o install experiment NAME=masking
ablation-arch: install
	$(MAKE) -o install experiment NAME=architecture
sizes: install
	$(MAKE) -o install experiment NAME=sizes
# MicroDiT against Fluid (random and raster order) at equal training FLOPs
families: install
	$(MAKE) -o install experiment NAME=families
# The paper's deferred masking against no masking, TREAD routing and SPRINT fusion at equal training FLOPs, with the
# GenEval-style score along training (convergence speed-ups): docs/routing.md
routing: install
	$(MAKE) -o install experiment NAME=routing
