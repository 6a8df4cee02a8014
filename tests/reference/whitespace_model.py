"""Build a tiny llama that answers only whitespace, with SmolLM2's tokenizer:
for the test that whitespace streams as it is decoded (tests/streaming.rs).

Usage: python whitespace_model.py SMOLLM2_DIR OUT_DIR

The final norm keeps one dimension of the hidden state (its weight is 1
there, 0 elsewhere) and the output head has two non-zero rows, +1 and -1 on
that dimension, for the tokens " " and "\\n": whatever the sign of that
dimension, one of the two gets the only positive logit, every other token 0.
So greedy decoding (and, with a large enough margin, sampling) yields only
those two tokens, never end-of-sequence.
"""

import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
from mlx_lm.models import llama
from mlx_lm.utils import save_config, save_model
from tokenizers import Tokenizer


def main():
    smol, out = Path(sys.argv[1]), Path(sys.argv[2])
    tok = Tokenizer.from_file(str(smol / "tokenizer.json"))
    ids = [tok.encode(t, add_special_tokens=False).ids for t in (" ", "\n")]
    assert all(len(i) == 1 for i in ids), ids
    space, newline = ids[0][0], ids[1][0]
    config = {
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 49152,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
    }
    mx.random.seed(3)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    norm = mx.zeros((64,)).at[0].add(1.0)
    head = mx.zeros((49152, 64))
    head = head.at[space, 0].add(8.0).at[newline, 0].add(-8.0)
    model.update({"model": {"norm": {"weight": norm}}, "lm_head": {"weight": head}})
    mx.eval(model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model)
    save_config(config, out / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smol / name, out / name)
    (out / "whitespace.json").write_text(json.dumps({"space": space, "newline": newline}))
    print(f"whitespace model in {out} (tokens {space} and {newline})")


if __name__ == "__main__":
    main()
