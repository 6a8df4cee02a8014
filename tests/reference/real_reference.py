"""mlx-lm's and Hugging Face's outputs for a real model directory (the
converted SmolLM2): chat-templated prompt ids, last-position logits, 32 greedy
tokens, tokenizer ids for tricky strings, and rendered templates.

Usage: python real_reference.py MODEL_DIR OUT.json
"""

import json
import sys

import mlx.core as mx
from mlx_lm import load
from mlx_lm.models import cache as cache_mod
from tokenizers import Tokenizer

mx.set_default_device(mx.cpu)

TRICKY = [
    "Hello, world!",
    "The year 2026 has 365 days; π ≈ 3.14159.",
    "def f(x):\n    return x**2  # square\n\ttabbed",
    "emoji: 🦀🚀 and a family 👨‍👩‍👧",
    "中文，日本語のテキスト、한국어",
    "<|im_start|>user\nhi<|im_end|>\n",
    "   leading and trailing spaces   ",
    "naïve café résumé — “quotes” ‘single’",
    "12345678901234567890",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "List 3 colors."},
    ],
]


def main():
    path, out = sys.argv[1], sys.argv[2]
    model, tok = load(path)
    prompt = tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True)
    logits = model(mx.array([prompt]))[0, -1].astype(mx.float32)
    cache = cache_mod.make_prompt_cache(model)
    step = model(mx.array([prompt]), cache=cache)
    greedy = []
    for _ in range(32):
        y = mx.argmax(step[0, -1]).item()
        greedy.append(y)
        step = model(mx.array([[y]]), cache=cache)
    raw = Tokenizer.from_file(f"{path}/tokenizer.json")
    ref = {
        "prompt": prompt,
        "last_logits": logits.tolist(),
        "greedy": greedy,
        "encodings": [{"text": s, "ids": raw.encode(s, add_special_tokens=False).ids} for s in TRICKY],
        "renders": [
            {
                "messages": c,
                "text": tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
            }
            for c in CONVERSATIONS
        ],
    }
    with open(out, "w") as f:
        json.dump(ref, f)


if __name__ == "__main__":
    main()
