"""mlx-lm's numbers for the same prompts as benches/model.rs, through
mlx_lm.generate's stream_generate on the CPU: prefill tokens/s at 512 and
2048 prompt tokens, decode tokens/s for 64 tokens, peak memory.

Usage: python mlx_lm_generate.py MODEL_DIR [--sizes 512,2048]
"""

import argparse

import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import stream_generate


def bench_text():
    # The same text as bench_text() in benches/model.rs.
    return " ".join(f"item {i} maps to {i * 7 % 13} in table {i % 5};" for i in range(4000))


def run(model, tok, prompt, max_tokens):
    last = None
    for r in stream_generate(model, tok, prompt, max_tokens=max_tokens):
        last = r
    return last


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--sizes", default="512,2048")
    args = ap.parse_args()
    mx.set_default_device(mx.cpu)
    model, tok = load(args.model)
    ids = tok.encode(bench_text(), add_special_tokens=False)
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        mx.reset_peak_memory()
        r = run(model, tok, ids[:n], 1)
        rows.append((f"prefill {n}", f"{r.prompt_tps:.1f} tok/s", f"{r.peak_memory * 1e3:.1f} MB"))
    mx.reset_peak_memory()
    r = run(model, tok, ids[:32], 64)
    rows.append(("decode 64", f"{r.generation_tps:.2f} tok/s", f"{r.peak_memory * 1e3:.1f} MB"))
    print("| mlx-lm 0.32.2 (mlx_lm.generate, CPU) | speed | peak memory |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
