# kvserve: set-up, build, test, run. Each target pulls in what it needs, so
# `make test` and `make run` work alone on a new machine.
SHELL := bash
CARGO ?= cargo
CARGO_FLAGS ?= --release
ARGS ?=

VENV := .venv
PYTHON := $(VENV)/bin/python
FIXTURES := target/fixtures

.PHONY: all setup vendor venv fixtures build test run bench clean distclean

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

# Test fixtures generated at test time: tiny random models of every
# architecture built by mlx-lm, with mlx-lm's outputs for them.
fixtures: $(FIXTURES)/tiny/.complete
$(FIXTURES)/tiny/.complete: tests/reference/make_tiny.py $(VENV)/.installed
	rm -rf $(FIXTURES)/tiny
	$(PYTHON) tests/reference/make_tiny.py $(FIXTURES)/tiny
	touch $@

build: setup vendor
	$(CARGO) build $(CARGO_FLAGS)

test: setup vendor fixtures
	$(CARGO) test $(CARGO_FLAGS)

run: build
	$(CARGO) run $(CARGO_FLAGS) -- info $(ARGS)

bench: setup vendor
	$(CARGO) bench --bench matmul

clean:
	$(CARGO) clean

# Also forget the fetched MLX wheel and mlx-c sources.
distclean: clean
	rm -rf vendor/mlx vendor/mlx-c vendor/downloads $(VENV)
