#!/usr/bin/env bash
# Print the MLX backend for this machine (make's BACKEND=auto): cuda13 when
# nvidia-smi lists a GPU and its driver supports CUDA 13, cuda12 for CUDA 12,
# else cpu (also on macOS, where the Makefile's cpu means the Metal wheel).
set -u
if [ "$(uname -s)" = Linux ] && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    v=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\)\..*/\1/p' | head -1)
    if [ "${v:-0}" -ge 13 ]; then echo cuda13; exit 0; fi
    if [ "${v:-0}" -ge 12 ]; then echo cuda12; exit 0; fi
fi
echo cpu
