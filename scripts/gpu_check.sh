#!/usr/bin/env bash
# The GPU check: kvserve built against MLX's CUDA wheel, on a machine with an
# NVIDIA GPU and no network. Needs what scripts/gpu_bundle.sh prepared (BUNDLE:
# libmlx.so.xz.0/.1 and bundle.tar.xz, in one folder or its part1/ part2/),
# this repository's scripts, an NVIDIA driver (580+ for CUDA 13), and a
# python3 (3.12) whose packages include the CUDA runtime wheels (nvidia-cublas,
# nvidia-cudnn-cu13, nvidia-nccl-cu13, nvidia-cufft, nvidia-cuda-nvrtc,
# nvidia-cuda-runtime), numpy and transformers, as PyTorch's CUDA 13 install has.
#
# Steps (each prints its time; it all takes about 4 minutes on an H100):
#   1. unpack: libmlx.so, the mlx and mlx-lm wheels and kvserve into one
#      site-packages-style folder, nvidia/ linked to the machine's runtime wheels;
#   2. a random-weight SmolLM2-135M-shaped model (mlx-lm's classes, 4-bit, bf16);
#   3. kvserve check on the GPU (backend and device line);
#   3b. that model split over 1-3 ranks of MLX's ring on loopback
#      (benches/pipeline_steps.py), each answer against one process's;
#   4. parity: mlx-lm builds tests/parity.rs's tiny models and computes their
#      reference logits and greedy tokens ON THE GPU (make_tiny.py with
#      KVSERVE_REF_DEVICE=gpu); the parity tests, built for CUDA, compare;
#      4b. snapshot resumes (prefix_exactness);
#   5. benchmark: benches/gpu_bench.py, kvserve against mlx_lm.server on the
#      SmolLM2-shaped model, then, time permitting (GPU_CHECK_BIG=0 skips
#      it), a Qwen3-4B-shaped one (6).
# Results go to OUT_DIR (default results/gpu; also $OUT when set).
# Usage: bash scripts/gpu_check.sh BUNDLE [OUT_DIR]
set -uo pipefail
bundle="${1:?usage: scripts/gpu_check.sh BUNDLE [OUT_DIR]}"
out="${2:-results/gpu}"
w="${GPU_WORK:-/tmp/kvserve-gpu}"
py="${PYTHON:-python3}"
t0=$(date +%s)
step() { echo; echo "== $* (at $(( $(date +%s) - t0 )) s)"; }
die() { echo "gpu_check: $*" >&2; exit 1; }
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1

step "1. unpack"
parts=$(find "$bundle" -name 'libmlx.so.xz.*' | sort)
tarball=$(find "$bundle" -name bundle.tar.xz | head -1)
[ "$(echo "$parts" | wc -w)" = 2 ] && [ -n "$tarball" ] || die "$bundle lacks libmlx.so.xz.0, libmlx.so.xz.1 or bundle.tar.xz"
rm -rf "$w" && mkdir -p "$w/stage" "$w/site"
tar -xJf "$tarball" -C "$w/stage" || die "cannot unpack $tarball"
cpu_run="${GPU_CHECK_CPU:-0}"   # 1: a dry run of this script with a CPU bundle, no GPU
if ! "$py" -m pip install --quiet --no-index --no-deps --no-compile --target "$w/site" "$w/stage"/wheels/*.whl; then
    # (a dry run's Python may be another version than the wheels': it uses its own mlx-lm)
    [ "$cpu_run" = 1 ] || die "pip could not install the wheels"
fi
mkdir -p "$w/site/mlx/lib" "$w/site/bin"
# shellcheck disable=SC2086
cat $parts | "$py" -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)' > "$w/site/mlx/lib/libmlx.so" \
    || die "cannot decompress libmlx.so"
cp -R "$w/stage"/mlx_*.libs "$w/site/"
# headers NVRTC compiles MLX's run-time kernels with (CCCL)
[ -d "$w/stage/mlx_include" ] && rm -rf "$w/site/mlx/include" && cp -R "$w/stage/mlx_include" "$w/site/mlx/include"
cp "$w/stage"/bin/* "$w/site/bin/"
if [ "$cpu_run" != 1 ]; then
    nv=$("$py" -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null) || die "$py has no nvidia runtime wheels (pip install mlx-cuda-13's requirements)"
    # libraries only: a cu13/include there would be NVRTC's header folder, and
    # the runtime wheels' headers lack the compiler's (crt/mma.h)
    mkdir -p "$w/site/nvidia"
    for d in "$nv"/*/; do
        d=${d%/}; n=$(basename "$d")
        if [ -d "$d/include" ] && [ -d "$d/lib" ]; then mkdir -p "$w/site/nvidia/$n" && ln -sfn "$d/lib" "$w/site/nvidia/$n/lib"
        else ln -sfn "$d" "$w/site/nvidia/$n"; fi
    done
    # NVRTC's CUDA headers: MLX looks beside its wheel, then $CUDA_HOME, then /usr/local/cuda.
    if [ -z "${CUDA_HOME:-}" ] && [ ! -d /usr/local/cuda/include ] && [ -d "$nv/cu13/include" ]; then
        export CUDA_HOME="$nv/cu13"
    fi
    echo "CUDA headers: ${CUDA_HOME:-/usr/local/cuda} ($(ls -d /usr/local/cuda/include 2>/dev/null || echo 'no /usr/local/cuda/include'))"
fi
kv="$w/site/bin/kvserve"
export PYTHONPATH="$w/site${PYTHONPATH:+:$PYTHONPATH}"
echo "backend $(cat "$w/stage/BACKEND"), kvserve commit $(cat "$w/stage/COMMIT" 2>/dev/null)"
[ "$cpu_run" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || die "no nvidia-smi: no NVIDIA driver here"
missing=$(ldd "$kv" | grep "not found")
if [ -n "$missing" ]; then
    echo "the loader misses, through libmlx.so's RPATH:"; echo "$missing"
    [ "$cpu_run" = 1 ] && die "libraries missing"
    LD_LIBRARY_PATH=$(find -L "$nv" -maxdepth 3 -type d -name lib | paste -sd:)
    export LD_LIBRARY_PATH
    echo "so LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    ldd "$kv" | grep "not found" && die "libraries still missing"
fi
"$py" -c 'import mlx.core as mx, mlx_lm; print("python: mlx", mx.__version__, "mlx-lm", mlx_lm.__version__, "default device", mx.default_device())' \
    || die "mlx does not import"

step "2. random-weight models (mlx-lm's classes, 4-bit, bf16)"
"$py" benches/random_model.py --config benches/configs/smollm2-135m.json --tokenizer "$w/stage/tokenizers/smollm2" "$w/models/SmolLM2-135M-shape-random" \
    || die "could not write the SmolLM2-shaped model"

step "3. kvserve check"
timeout 120 "$kv" check --model "$w/models/SmolLM2-135M-shape-random"; echo "kvserve check exit $?"

step "3b. one model split over 1, 2 and 3 ranks on this GPU (MLX's ring backend on loopback; answers against one process's)"
KVSERVE="$kv" timeout 240 "$py" benches/pipeline_steps.py "$w/models/SmolLM2-135M-shape-random" --tokens 64 2>&1 | tee "$out/pipeline_steps.log"
echo "pipeline_steps exit ${PIPESTATUS[0]}"

step "4. parity with mlx-lm on the GPU"
ref_device=gpu; [ "$cpu_run" = 1 ] && ref_device=cpu
KVSERVE_REF_DEVICE=$ref_device timeout 300 "$py" tests/reference/make_tiny.py "$w/fixtures/tiny" || die "make_tiny.py failed"
KVSERVE_FIXTURES="$w/fixtures" timeout 300 "$w/site/bin/parity" --test-threads=1 2>&1 | tee "$out/parity.log"
echo "parity exit ${PIPESTATUS[0]}"
step "4b. snapshot resumes on the GPU (tiny models: exact, trimmed, from disk; qwen3_5's trims refused)"
KVSERVE_FIXTURES="$w/fixtures" timeout 300 "$w/site/bin/prefix_exactness" --test-threads=1 --nocapture tiny 2>&1 | tee "$out/prefix_exactness.log"
echo "prefix_exactness exit ${PIPESTATUS[0]}"

step "5. benchmark: SmolLM2-135M shape"
timeout 300 "$py" benches/gpu_bench.py --kvserve "$kv" --model "$w/models/SmolLM2-135M-shape-random" --out "$out/bench-smollm2.md" ${GPU_BENCH_ARGS:-}
echo "bench exit $?"

if [ "${GPU_CHECK_BIG:-1}" != 0 ] && [ $(( $(date +%s) - t0 )) -lt 330 ]; then
    step "6. benchmark: Qwen3-4B shape"
    "$py" benches/random_model.py --config benches/configs/qwen3-4b.json --tokenizer "$w/stage/tokenizers/qwen3" "$w/models/Qwen3-4B-shape-random" \
        && timeout 240 "$py" benches/gpu_bench.py --kvserve "$kv" --model "$w/models/Qwen3-4B-shape-random" --out "$out/bench-qwen3-4b.md" ${GPU_BENCH_ARGS:-}
    echo "bench exit $?"
fi
step "done"
[ -n "${OUT:-}" ] && cp "$out"/* "$OUT"/ 2>/dev/null
exit 0
