"""mlx-lm's KV cache as kvserve keeps it: keys and values stored in float16
and read back in the compute dtype. The parity references run mlx-lm's
models with it (and record the f32-cache logits beside, for comparison)."""

import mlx.core as mx
from mlx_lm.models import cache as cache_mod


class F16KVCache(cache_mod.KVCache):
    def update_and_fetch(self, keys, values):
        dtype = keys.dtype
        k, v = super().update_and_fetch(keys.astype(mx.float16), values.astype(mx.float16))
        return k.astype(dtype), v.astype(dtype)


def f16_cache(model):
    """One F16KVCache per attention layer of `model`; linear-attention layers
    (qwen3_5) keep mlx-lm's own recurrent state (ArraysCache)."""
    return [
        cache_mod.ArraysCache(size=2) if getattr(l, "is_linear", False) else F16KVCache()
        for l in model.layers
    ]
