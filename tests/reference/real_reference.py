"""mlx-lm's and Hugging Face's outputs for a real model directory (the
converted SmolLM2): chat-templated prompt ids, last-position logits and 32
greedy tokens. (Tokenizer and template parity: tokenizer_reference.py.)

Usage: python real_reference.py MODEL_DIR OUT.json
"""

import json
import sys

import mlx.core as mx
from mlx_lm import load
from mlx_lm.models import cache as cache_mod

mx.set_default_device(mx.cpu)

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def main():
    path, out = sys.argv[1], sys.argv[2]
    model, tok = load(path)
    prompt = tok.apply_chat_template(PROMPT, add_generation_prompt=True)
    logits = model(mx.array([prompt]))[0, -1].astype(mx.float32)
    cache = cache_mod.make_prompt_cache(model)
    step = model(mx.array([prompt]), cache=cache)
    greedy = []
    for _ in range(32):
        y = mx.argmax(step[0, -1]).item()
        greedy.append(y)
        step = model(mx.array([[y]]), cache=cache)
    ref = {
        "messages": PROMPT,
        "prompt": prompt,
        "last_logits": logits.tolist(),
        "greedy": greedy,
    }
    with open(out, "w") as f:
        json.dump(ref, f)


if __name__ == "__main__":
    main()
