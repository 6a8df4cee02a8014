#!/usr/bin/env bash
# Prepare, on any Linux x86_64 machine (no GPU needed), everything
# scripts/gpu_check.sh needs on a GPU machine that has no network:
#   .gpu/part1/libmlx.so.xz.0  .gpu/part2/libmlx.so.xz.1
#       the CUDA wheel's libmlx.so, stripped and xz-compressed (116 MB to about
#       67 MB), cut in two so that each half travels in a call under 64 MiB;
#   .gpu/part2/bundle.tar.xz
#       bin/kvserve, bin/parity and bin/prefix_exactness (tests/), built against that
#       libmlx.so and stripped; the wheel's bundled BLAS/LAPACK; the pinned
#       mlx and mlx-lm wheels (benches/gpu-requirements.txt); the SmolLM2 and
#       Qwen3 tokenizers the benchmark's models use.
# Usage: scripts/gpu_bundle.sh [OUT_DIR (.gpu)]   (MLX_BACKEND: cuda13, the default, or cuda12;
# cpu makes the same bundle for a dry run of gpu_check.sh here, GPU_CHECK_CPU=1)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${1:-.gpu}"
backend="${MLX_BACKEND:-cuda13}"
[ "$backend" = cuda ] && backend=cuda13
case "$backend" in cuda13) wheel=mlx-cuda-13; libs=mlx_cuda_13.libs ;; cuda12) wheel=mlx-cuda-12; libs=mlx_cuda_12.libs ;;
    cpu) wheel=mlx-cpu; libs=mlx_cpu.libs ;;  # a dry run of gpu_check.sh on a CPU machine (GPU_CHECK_CPU=1)
    *) echo "gpu_bundle: MLX_BACKEND must be cuda13, cuda12 or cpu, not '$backend'" >&2; exit 1 ;; esac
if [ "$backend" = cpu ]; then target="${CARGO_TARGET_DIR:-target}"; vb=""; else target="${CARGO_TARGET_DIR:-target/$backend}"; vb="$backend"; fi
smol_tok="models/SmolLM2-135M-Instruct"
qwen_tok="target/fixtures/qwen3-tokenizer"
[ -f "$smol_tok/tokenizer.json" ] || make model
[ -f "$qwen_tok/tokenizer.json" ] || bash scripts/fetch_qwen3_tokenizer.sh "$qwen_tok"

MLX_BACKEND="$vb" bash scripts/vendor.sh
echo "gpu_bundle: building kvserve and the parity tests against $wheel (target dir $target)"
CARGO_TARGET_DIR="$target" MLX_BACKEND="$vb" cargo build --release --bin kvserve
test_bin() {
    CARGO_TARGET_DIR="$target" MLX_BACKEND="$vb" cargo test --release --no-run --test "$1" --message-format=json \
        | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]: print(m["executable"])' "$1"
}
parity="$(test_bin parity)"
exactness="$(test_bin prefix_exactness)"
[ -x "$parity" ] && [ -x "$exactness" ] || { echo "gpu_bundle: no parity or prefix_exactness test executable" >&2; exit 1; }

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/wheels" "$stage/tokenizers/smollm2" "$stage/tokenizers/qwen3"
cp "$target/release/kvserve" "$stage/bin/kvserve"
cp "$parity" "$stage/bin/parity"
cp "$exactness" "$stage/bin/prefix_exactness"
strip "$stage/bin/kvserve" "$stage/bin/parity" "$stage/bin/prefix_exactness"
cp -R "vendor/mlx/$wheel-0.32.2/$libs" "$stage/$libs"
# The CUDA wheel's headers (CCCL, CuTe): MLX compiles some kernels at run time
# with NVRTC, which reads them from mlx/include beside mlx/lib.
[ -d "vendor/mlx/$wheel-0.32.2/mlx/include" ] && cp -R "vendor/mlx/$wheel-0.32.2/mlx/include" "$stage/mlx_include"
python3 -m pip download --quiet --no-deps --require-hashes --only-binary=:all: --platform manylinux_2_35_x86_64 \
    --python-version 3.12 -d "$stage/wheels" -r benches/gpu-requirements.txt
for f in tokenizer.json tokenizer_config.json generation_config.json; do
    [ -f "$smol_tok/$f" ] && cp "$smol_tok/$f" "$stage/tokenizers/smollm2/"
    [ -f "$qwen_tok/$f" ] && cp "$qwen_tok/$f" "$stage/tokenizers/qwen3/"
done
echo "$backend" > "$stage/BACKEND"
git rev-parse --short HEAD > "$stage/COMMIT" 2>/dev/null || true

rm -rf "$out"
mkdir -p "$out/part1" "$out/part2"
tar -C "$stage" -cf - . | xz -T2 -6 > "$out/part2/bundle.tar.xz"
strip -o "$stage/libmlx.so" "vendor/mlx/$wheel-0.32.2/mlx/lib/libmlx.so"
echo "gpu_bundle: compressing libmlx.so ($(du -m "$stage/libmlx.so" | cut -f1) MB stripped; about a minute)"
xz -T2 -9 -c "$stage/libmlx.so" > "$stage/libmlx.so.xz"
split -n 2 -d -a 1 "$stage/libmlx.so.xz" "$stage/libmlx.so.xz."
mv "$stage/libmlx.so.xz.0" "$out/part1/"
mv "$stage/libmlx.so.xz.1" "$out/part2/"
(cd "$out" && sha256sum part*/* > SHA256SUMS)
du -sh "$out"/part1 "$out"/part2
echo "gpu_bundle: ready in $out; on the GPU machine: bash scripts/gpu_check.sh $out"
