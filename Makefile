# kvserve: set-up, build, test, run. Each target pulls in what it needs, so
# `make test` and `make run` work alone on a new machine.
SHELL := bash
CARGO ?= cargo
CARGO_FLAGS ?= --release
ARGS ?=

.PHONY: all setup vendor build test run bench clean distclean

all: build

# System packages (Debian: libclang-dev for bindgen, OpenBLAS); only those missing.
setup:
	@bash scripts/setup.sh

# The pinned MLX wheel and mlx-c sources into vendor/ (checked by sha256).
vendor:
	@bash scripts/vendor.sh

build: setup vendor
	$(CARGO) build $(CARGO_FLAGS)

test: setup vendor
	$(CARGO) test $(CARGO_FLAGS)

run: build
	$(CARGO) run $(CARGO_FLAGS) -- info $(ARGS)

bench: setup vendor
	$(CARGO) bench --bench matmul

clean:
	$(CARGO) clean

# Also forget the fetched MLX wheel and mlx-c sources.
distclean: clean
	rm -rf vendor/mlx vendor/mlx-c vendor/downloads
