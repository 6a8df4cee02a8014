"""Rewrite a GGUF model with its tensors in other types, keeping its metadata:
the whole-model oracle for kvserve's GGUF conversions (tests/gguf_models.rs).

Usage: python gguf_twin.py SRC.gguf OUT.gguf MODE
MODE:
  f32           every tensor dequantized by the gguf package (its reference
                dequantization), as F32: what any quantized copy must equal;
  q5            2-D weights requantized by the gguf package, alternating Q5_0
                and Q5_1 (the real weights: the model still answers);
  random:T1,T2  2-D weights replaced by random blocks of T1, T2, ... in
                turn (small scales; a type whose block does not divide the
                rows is passed over), others kept; with its f32 twin this
                checks every conversion end to end.
"""

import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize

from gguf_blocks import F16_FIELDS  # the blocks' float16 scale fields


def random_blocks(rng, name, rows, cols):
    qtype = T[name]
    block, size = GGML_QUANT_SIZES[qtype]
    n = rows * cols // block
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    # Scales small enough that values stay of the size of real weights (|w| < ~0.2).
    hi = {"Q6_K": 2e-4, "Q3_K": 2e-3, "Q2_K": 1e-2}.get(name, 4e-3)
    for at in F16_FIELDS[name]:
        raw[:, at:at + 2] = rng.uniform(hi / 4, hi, n).astype(np.float16).view(np.uint8).reshape(n, 2)
    return raw.reshape(rows, -1), qtype


def main():
    src, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(out, arch)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", "general.alignment"):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    rng = np.random.default_rng(7)
    cycle = mode.split(":", 1)[1].split(",") if mode.startswith("random:") else []
    k = 0
    turn = {}
    for t in r.tensors:
        rows_cols = tuple(int(x) for x in reversed(t.shape))  # (rows, cols) for 2-D
        values = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(rows_cols)
        if mode == "f32" or len(rows_cols) != 2:
            w.add_tensor(t.name, values)
            continue
        rows, cols = rows_cols
        if mode == "q5":
            qt = [T.Q5_0, T.Q5_1][k % 2]
            k += 1
            w.add_tensor(t.name, quantize(values, qt), raw_dtype=qt)
        elif fits := [n for n in cycle if cols % GGML_QUANT_SIZES[T[n]][0] == 0]:
            # the fitting types in turn (rows of 576 take 32-blocks only, of 1536 K-quants too)
            key = tuple(fits)
            name = fits[turn.get(key, 0) % len(fits)]
            turn[key] = turn.get(key, 0) + 1
            data, qt = random_blocks(rng, name, rows, cols)
            w.add_tensor(t.name, data, raw_dtype=qt)
        else:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {out} ({mode})")


if __name__ == "__main__":
    main()
