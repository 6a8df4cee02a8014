"""mlx-lm's last-position logits for a prompt on an MLX-format model folder
(as `kvserve convert` writes one), with kvserve's f16 KV cache (kv16.py).

Usage: python mlx_lm_logits.py MODEL_DIR IDS OUT.json   (IDS: comma-separated token ids)
"""

import json
import sys

import mlx.core as mx
from mlx_lm import load

from kv16 import f16_cache

mx.set_default_device(mx.cpu)


def main():
    model, _ = load(sys.argv[1])
    ids = [int(x) for x in sys.argv[2].split(",")]
    logits = model(mx.array([ids]), cache=f16_cache(model))[0, -1].astype(mx.float32)
    with open(sys.argv[3], "w") as f:
        json.dump(logits.tolist(), f)
    print("done: mlx-lm logits")


if __name__ == "__main__":
    main()
