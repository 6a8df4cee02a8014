"""Build tiny random models with mlx-lm's own classes, save them in MLX format,
and record mlx-lm's outputs for them: the numerical oracle for kvserve's
parity tests.

Usage: python make_tiny.py OUT_DIR
Writes OUT_DIR/<name>/ (config.json, model.safetensors) and
OUT_DIR/<name>/reference.json with the prompt ids, mlx-lm's last-position
logits for the whole prompt, and its 32 greedy tokens, computed with an f16
KV cache as kvserve keeps it (kv16.py); also the logits with f32 keys
and values (`last_logits_f32_kv`), to state what f16 storage changes.
"""

import json
import os
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import quantize_model, save_config, save_model

from kv16 import f16_cache

# KVSERVE_REF_DEVICE=gpu computes the reference on the GPU (scripts/gpu_check.sh).
mx.set_default_device(mx.gpu if os.environ.get("KVSERVE_REF_DEVICE") == "gpu" else mx.cpu)

# mlx-lm 0.32.2 passes `global_scale` to gather_qmm, an argument MLX gained only
# after 0.32.2; drop it when unset so the same pinned pair can run MoE models.
_gather_qmm = mx.gather_qmm


def _gather_qmm_compat(*args, global_scale=None, **kwargs):
    if global_scale is not None:
        raise ValueError("global_scale needs a newer MLX than 0.32.2")
    return _gather_qmm(*args, **kwargs)


mx.gather_qmm = _gather_qmm_compat

BASE = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 320,
    "max_position_embeddings": 2048,
}

MODELS = {
    # name: (module, extra config, quantization (group_size, bits) or None)
    "llama_q4": ("llama", {"rope_theta": 10000.0, "tie_word_embeddings": True}, (64, 4)),
    "llama3_q8_untied": (
        "llama",
        {
            "rope_theta": 500000.0,
            "tie_word_embeddings": False,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
        (32, 8),
    ),
    "llama_f32": ("llama", {"rope_theta": 10000.0, "tie_word_embeddings": True}, None),
    "qwen2_q4": ("qwen2", {"rope_theta": 1000000.0, "tie_word_embeddings": True}, (64, 4)),
    "qwen3_q4": (
        "qwen3",
        {"rope_theta": 1000000.0, "tie_word_embeddings": False, "head_dim": 32},
        (128, 4),
    ),
    "qwen3_moe_q4": (
        "qwen3_moe",
        {
            "rope_theta": 1000000.0,
            "tie_word_embeddings": False,
            "head_dim": 32,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
        },
        (64, 4),
    ),
    "glm4_moe_q4": (
        "glm4_moe",
        {
            "num_hidden_layers": 3,
            "rope_theta": 1000000.0,
            "rope_scaling": None,
            "tie_word_embeddings": False,
            "head_dim": 32,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "norm_topk_prob": True,
            "n_group": 4,
            "topk_group": 2,
            "n_shared_experts": 1,
            "routed_scaling_factor": 2.5,
            "first_k_dense_replace": 1,
            "use_qk_norm": True,
            "attention_bias": True,
            "partial_rotary_factor": 0.5,
        },
        (64, 4),
    ),
    "gpt_oss_q4": (
        "gpt_oss",
        {
            "num_hidden_layers": 4,
            "head_dim": 32,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "intermediate_size": 64,
            "sliding_window": 8,
            "rope_theta": 150000.0,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 32.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "original_max_position_embeddings": 4096,
            },
        },
        (64, 4),
    ),
    # Hybrids: gated delta-net layers with full attention every 2nd layer
    # (mlx-lm's ops path on the CPU; its Metal kernel is not used).
    "qwen3_5_q4": (
        "qwen3_5",
        {
            "num_hidden_layers": 4,
            "head_dim": 32,
            "tie_word_embeddings": False,
            "linear_num_value_heads": 4,
            "linear_num_key_heads": 2,
            "linear_key_head_dim": 32,
            "linear_value_head_dim": 32,
            "linear_conv_kernel_dim": 4,
            "full_attention_interval": 2,
            "rope_parameters": {"type": "default", "rope_theta": 100000.0, "partial_rotary_factor": 0.25},
        },
        (64, 4),
    ),
    "qwen3_5_moe_q4": (
        "qwen3_5_moe",
        {
            "num_hidden_layers": 4,
            "head_dim": 32,
            "tie_word_embeddings": False,
            "linear_num_value_heads": 4,
            "linear_num_key_heads": 4,
            "linear_key_head_dim": 32,
            "linear_value_head_dim": 32,
            "linear_conv_kernel_dim": 4,
            "full_attention_interval": 2,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 64,
            "norm_topk_prob": True,
        },
        (64, 4),
    ),
    # The same hybrid with SmolLM2's vocabulary, served over HTTP with
    # SmolLM2's tokenizer and template (tests/hybrid_session.rs).
    "qwen3_5_vocab49152": (
        "qwen3_5",
        {
            "vocab_size": 49152,
            "num_hidden_layers": 4,
            "head_dim": 32,
            "tie_word_embeddings": True,
            "linear_num_value_heads": 4,
            "linear_num_key_heads": 2,
            "linear_key_head_dim": 32,
            "linear_value_head_dim": 32,
            "full_attention_interval": 2,
            "eos_token_id": 2,
        },
        (64, 4),
    ),
}


def with_smollm2_vocab(name, **changes):
    """A tiny model of MODELS with SmolLM2's vocabulary (and `changes`), for
    tests that serve it over HTTP with SmolLM2's tokenizer."""
    module, extra, quant = MODELS[name]
    return (module, {**extra, "vocab_size": 49152, "eos_token_id": 2, **changes}, quant)


# Mixtures of experts served split by heads over 2 ranks
# (tests/pipeline_serve.rs): their expert widths (128) are two quantization
# groups, so each rank keeps whole groups. glm4_moe has a dense first layer,
# a shared expert, the grouped sigmoid router, q/k/v biases, q/k norms and
# partial rotary; gpt_oss attention sinks, sliding windows, biases on o_proj
# and the experts, and YaRN. (mlx-lm's glm4_moe and gpt_oss keep an lm_head.)
MODELS["qwen3_moe_vocab49152"] = with_smollm2_vocab("qwen3_moe_q4", moe_intermediate_size=128, tie_word_embeddings=True)
MODELS["glm4_moe_vocab49152"] = with_smollm2_vocab("glm4_moe_q4", moe_intermediate_size=128)
MODELS["gpt_oss_vocab49152"] = with_smollm2_vocab("gpt_oss_q4", intermediate_size=128)

PROMPT = [5, 17, 42, 99, 7, 250, 3, 3, 128, 64, 31, 200, 11, 0, 19, 77, 301, 150, 22, 9]
GREEDY = 32


def build(name, module_name, extra, quant, out: Path):
    module = __import__(f"mlx_lm.models.{module_name}", fromlist=["Model", "ModelArgs"])
    config = {"model_type": module_name, **BASE, **extra}
    mx.random.seed(sum(map(ord, name)))
    args = module.ModelArgs.from_dict(config)
    model = module.Model(args)
    # Random init has tiny logits; scale weights up so greedy choices are decisive.
    params = tree_flatten(model.parameters())
    model.load_weights(
        [(k, v * 4.0 if "norm" not in k else v) for k, v in params], strict=True
    )
    # Parameters that start at zero (glm4_moe's router correction, gpt_oss's
    # attention sinks and expert biases) get values, so that what they do is
    # tested.
    # Gated delta nets: decays between 0.74 and 0.98 a token at a = 0 (a
    # fourfold A_log would erase the state at every token, and with it
    # what the state is there to test).
    decays = [(k, mx.log(mx.random.uniform(0.02, 0.3, v.shape))) for k, v in tree_flatten(model.parameters())
              if k.endswith("A_log")]
    decays += [(k, mx.zeros(v.shape)) for k, v in tree_flatten(model.parameters()) if k.endswith("dt_bias")]
    if decays:
        model.load_weights(decays, strict=False)
    zero = [(k, mx.random.normal(v.shape) * 0.5) for k, v in tree_flatten(model.parameters())
            if "norm" not in k and not mx.any(v != 0).item()]
    if zero:
        model.load_weights(zero, strict=False)
    if quant is not None:
        group_size, bits = quant
        model, config = quantize_model(model, config, group_size, bits)
    mx.eval(model.parameters())
    path = out / name
    path.mkdir(parents=True, exist_ok=True)
    save_model(path, model, donate_model=False)
    save_config(config, config_path=path / "config.json")

    # Without a cache: keys and values in f32 throughout.
    logits_f32_kv = model(mx.array([PROMPT]))[0, -1].astype(mx.float32)
    # kvserve keeps its KV cache in f16: the same model and prompt through
    # mlx-lm's own KVCache holding f16 keys and values.
    cache = f16_cache(model)
    out_logits = model(mx.array([PROMPT]), cache=cache)
    logits = out_logits[0, -1].astype(mx.float32)
    tokens = []
    y = mx.argmax(out_logits[0, -1])
    for _ in range(GREEDY):
        tokens.append(y.item())
        out_logits = model(y.reshape(1, 1), cache=cache)
        y = mx.argmax(out_logits[0, -1])
    ref = {
        "prompt": PROMPT,
        "last_logits": logits.tolist(),
        "last_logits_f32_kv": logits_f32_kv.tolist(),
        "greedy": tokens,
    }
    (path / "reference.json").write_text(json.dumps(ref))


def main():
    out = Path(sys.argv[1])
    only = set(sys.argv[2:])
    for name, (module_name, extra, quant) in MODELS.items():
        if only and name not in only:
            continue
        build(name, module_name, extra, quant, out)
        print(f"built {name}")


if __name__ == "__main__":
    main()
