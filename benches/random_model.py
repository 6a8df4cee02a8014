"""Write a random-weight MLX model with a real model's shapes and tokenizer,
for timing on machines that cannot download weights (scripts/gpu_check.sh).

Speed depends on shapes, not on weight values, so time to first token and
decode tokens/s on such a model are those of the real one; its text is noise.

Usage: python random_model.py --config CONFIG.json --tokenizer DIR OUT
  [--dtype bfloat16] [--bits 4] [--group-size 32] [--context 32768]

The model is built with mlx-lm's own classes (mlx-lm's random initialisation),
cast to --dtype, quantized by mlx-lm (--bits 0: not quantized) and saved in
MLX format with DIR's tokenizer files.
"""

import argparse
import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="a config.json with the real model's shapes")
    ap.add_argument("--tokenizer", required=True, help="folder with tokenizer.json and tokenizer_config.json")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--context", type=int, default=32768, help="max_position_embeddings written to the config")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("out")
    a = ap.parse_args()

    config = json.loads(Path(a.config).read_text())
    for k in ("quantization", "quantization_config"):
        config.pop(k, None)
    config["max_position_embeddings"] = max(a.context, config.get("max_position_embeddings", 0))
    mx.random.seed(a.seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    dtype = getattr(mx, a.dtype)
    model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()))
    mx.eval(model.parameters())
    if a.bits:
        model, config = quantize_model(model, config, a.group_size, a.bits)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model)
    save_config(config, out / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja"):
        src = Path(a.tokenizer) / name
        if src.exists():
            shutil.copy(src, out / name)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"random {config['model_type']} model ({a.dtype}, {a.bits or 'no'}-bit): {size / 1e6:.0f} MB of weights in {out}", flush=True)


if __name__ == "__main__":
    main()
