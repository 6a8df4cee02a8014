"""Random blocks of every quantized GGUF type kvserve loads, with the `gguf`
package's own dequantization of them: the oracle for tests/gguf_quants.rs.

Usage: python gguf_blocks.py OUT.json
Per type: 3 rows of 512 values (2 super-blocks of 256, or 16 blocks of 32),
random bytes except the blocks' float16 scales (and minima), which are set to
random finite values of a realistic size so that no value is inf or NaN.
"""

import json
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize

# Byte offsets of each type's float16 fields within a block.
F16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "IQ4_NL": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}
ROWS, COLS = 3, 512


def main():
    rng = np.random.default_rng(20261127)
    out = {}
    for name, fields in F16_FIELDS.items():
        qtype = T[name]
        block, size = GGML_QUANT_SIZES[qtype]
        n_blocks = ROWS * COLS // block
        raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
        for at in fields:
            # scales in [1e-3, 5e-2); Q4_1/Q5_1's minimum (second field) may be negative
            v = rng.uniform(1e-3, 5e-2, n_blocks).astype(np.float16)
            if at == 2 and name in ("Q4_1", "Q5_1"):
                v = (v * rng.choice([-1, 1], n_blocks)).astype(np.float16)
            raw[:, at:at + 2] = v.view(np.uint8).reshape(n_blocks, 2)
        data = raw.reshape(ROWS, -1)
        values = dequantize(data, qtype).astype(np.float32)
        assert values.shape == (ROWS, COLS) and np.isfinite(values).all(), name
        out[name] = {"type": int(qtype), "rows": ROWS, "cols": COLS, "raw": data.tobytes().hex(),
                     "values": [float(x) for x in values.reshape(-1)]}
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
    print(f"wrote {len(out)} types to {sys.argv[1]}")


if __name__ == "__main__":
    main()
