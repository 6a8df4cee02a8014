#!/usr/bin/env bash
# Install the system packages the build needs, only those missing.
# Debian/Ubuntu: libclang-dev (bindgen), OpenBLAS (fast cblas_sgemm), tmux (the
# interactive Claude Code test), and npm
# (test fixtures and Claude Code come from npm) unless a node install has it,
# plus any Debian packages named as arguments (scripts/llama_server.sh: cmake).
# macOS: Xcode command-line tools provide clang; nothing else is needed.
set -euo pipefail

case "$(uname -s)" in
Darwin)
    xcode-select -p >/dev/null 2>&1 || { echo "setup: run 'xcode-select --install' first" >&2; exit 1; }
    echo "setup: macOS: nothing to install"
    exit 0 ;;
Linux) ;;
*) echo "setup: unsupported OS $(uname -s)" >&2; exit 1 ;;
esac

if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "setup: not a Debian-like system: install libclang (for bindgen) and OpenBLAS yourself" >&2
    exit 0
fi

pkgs=(libclang-dev libopenblas-dev tmux "$@")
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -eq 0 ]; then
    echo "setup: system packages present (${pkgs[*]})"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    echo "setup: missing Debian packages: ${missing[*]}" >&2
    echo "setup: run as root, or: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: installed ${missing[*]}"
