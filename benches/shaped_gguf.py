"""Write a random-weight GGUF with the shapes of a model people run, in
llama.cpp's own tensor layout and names, with SmolLM2's tokenizer and chat
template, so that llama.cpp's llama-server and kvserve read the very same
file. Speed depends on shapes and types, not on values: time to first token
and tokens/s on it are those of the real model; its text is noise.

Usage: python shaped_gguf.py SHAPE OUT.gguf --tokenizer SMOLLM2.gguf
  [--type Q4_0|F16] [--layers N] [--context 32768]

SHAPE:
  1b   Llama-3.2-1B-like: llama, hidden 2048, 16 layers, 32/8 heads of 64,
       FFN 8192 (about 1.1B parameters with SmolLM2's 49152-token vocabulary)
  4b   Qwen3-4B-like: qwen3, hidden 2560, 36 layers, 32/8 heads of 128,
       FFN 9728, q/k norms
--layers keeps the per-layer shapes with fewer layers (say so beside numbers).
Q4_0 blocks are random bytes with scales that keep weights near real ones'
size (|w| < ~0.1); norms are near 1. F16 (for llama-quantize) is Gaussian.
"""

import argparse

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType, GGUFWriter

SHAPES = {
    "1b": dict(arch="llama", hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, ffn=8192, qk_norm=False, rope_base=500000.0),
    "4b": dict(arch="qwen3", hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, ffn=9728, qk_norm=True, rope_base=1000000.0),
}


def q4_0(rng, rows, cols):
    """Random Q4_0 blocks: an f16 scale, then 16 bytes of 4-bit values."""
    n = rows * cols // 32
    raw = rng.integers(0, 256, size=(n, 18), dtype=np.uint8)
    raw[:, 0:2] = rng.uniform(0.003, 0.006, n).astype(np.float16).view(np.uint8).reshape(n, 2)
    return raw.reshape(rows, cols // 32 * 18)


def matrix(rng, kind, rows, cols):
    if kind == "Q4_0":
        return q4_0(rng, rows, cols), T.Q4_0
    return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16), None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out")
    ap.add_argument("--tokenizer", required=True, help="a GGUF whose tokenizer and chat template to copy (SmolLM2's)")
    ap.add_argument("--type", default="Q4_0", choices=["Q4_0", "F16"])
    ap.add_argument("--layers", type=int, default=0, help="fewer layers of the same shapes")
    ap.add_argument("--context", type=int, default=32768)
    a = ap.parse_args()
    s = dict(SHAPES[a.shape])
    if a.layers:
        s["layers"] = a.layers
    arch = s["arch"]

    tok = GGUFReader(a.tokenizer)
    vocab = len(tok.fields["tokenizer.ggml.tokens"].contents())
    w = GGUFWriter(a.out, arch)
    w.add_name(f"random {a.shape}-shaped {arch}")
    for f in tok.fields.values():
        if f.name.startswith("tokenizer."):
            vtype = f.types[0]
            sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
            w.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    w.add_context_length(a.context)
    w.add_embedding_length(s["hidden"])
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_key_length(s["head_dim"])
    w.add_value_length(s["head_dim"])
    w.add_rope_dimension_count(s["head_dim"])
    w.add_rope_freq_base(s["rope_base"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    w.add_file_type(2 if a.type == "Q4_0" else 1)

    rng = np.random.default_rng(0)
    h, d, q, kv, ffn = s["hidden"], s["head_dim"], s["heads"], s["kv_heads"], s["ffn"]

    def add(name, rows, cols):
        data, qt = matrix(rng, a.type, rows, cols)
        if qt is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=qt)

    def norm(name, n):
        w.add_tensor(name, (1.0 + 0.05 * rng.standard_normal(n)).astype(np.float32))

    add("token_embd.weight", vocab, h)
    for i in range(s["layers"]):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight", h)
        add(p + "attn_q.weight", q * d, h)
        add(p + "attn_k.weight", kv * d, h)
        add(p + "attn_v.weight", kv * d, h)
        add(p + "attn_output.weight", h, q * d)
        if s["qk_norm"]:
            norm(p + "attn_q_norm.weight", d)
            norm(p + "attn_k_norm.weight", d)
        norm(p + "ffn_norm.weight", h)
        add(p + "ffn_gate.weight", ffn, h)
        add(p + "ffn_up.weight", ffn, h)
        add(p + "ffn_down.weight", h, ffn)
    norm("output_norm.weight", h)
    add("output.weight", vocab, h)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    params = vocab * h * 2 + s["layers"] * (h * d * (q + 2 * kv) + q * d * h + 3 * h * ffn)
    print(f"wrote {a.out}: {a.shape}-shaped {arch}, {s['layers']} layers, {params / 1e9:.2f}B parameters, {a.type}")


if __name__ == "__main__":
    main()
