"""mlx-lm's and Hugging Face's outputs for a real model directory (the
converted SmolLM2): chat-templated prompt ids, last-position logits and 32
greedy tokens, with mlx-lm's KV cache holding f16 keys and values as
kvserve's does (kv16.py); also the logits with f32 keys and values. (Tokenizer and template parity: tokenizer_reference.py.)

Usage: python real_reference.py MODEL_DIR OUT.json
"""

import json
import sys

import mlx.core as mx
from mlx_lm import load

from kv16 import f16_cache

mx.set_default_device(mx.cpu)

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def main():
    path, out = sys.argv[1], sys.argv[2]
    model, tok = load(path)
    prompt = tok.apply_chat_template(PROMPT, add_generation_prompt=True)
    # Keys and values in f32 (no cache), then in f16 as kvserve keeps them.
    logits_f32_kv = model(mx.array([prompt]))[0, -1].astype(mx.float32)
    cache = f16_cache(model)
    step = model(mx.array([prompt]), cache=cache)
    logits = step[0, -1].astype(mx.float32)
    greedy = []
    for _ in range(32):
        y = mx.argmax(step[0, -1]).item()
        greedy.append(y)
        step = model(mx.array([[y]]), cache=cache)
    ref = {
        "messages": PROMPT,
        "prompt": prompt,
        "last_logits": logits.tolist(),
        "last_logits_f32_kv": logits_f32_kv.tolist(),
        "greedy": greedy,
    }
    with open(out, "w") as f:
        json.dump(ref, f)


if __name__ == "__main__":
    main()
