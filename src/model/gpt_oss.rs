//! gpt_oss: attention with biases, learned per-head sinks and, on alternate
//! layers (`layer_types`), a sliding window; YaRN rotary scaling; a mixture
//! of experts on every layer whose router takes the top-k logits and a
//! softmax over them, with biased experts and the clamped SwiGLU
//! ([`super::qwen3_moe::SparseMoe`]).
//!
//! Sliding layers keep every position in kvserve's cache (mlx-lm keeps a
//! rotating window) and attend through a window mask: the same attention,
//! and snapshots at any position stay exact. Checkpoints must be in MLX
//! format with affine quantization (mlx-lm's sanitized names); the original
//! MXFP4 release is not read.

use super::config::ModelConfig;
use super::layers::{Transformer, Weights};
use super::ModelError;

pub fn build(cfg: &ModelConfig, w: &mut Weights) -> Result<Transformer, ModelError> {
    if w.contains("model.layers.0.mlp.experts.gate_up_proj") || w.contains("model.layers.0.mlp.experts.gate_up_proj_blocks") {
        return Err(ModelError::Invalid(
            "this gpt_oss checkpoint is the original release (interleaved gate_up_proj, MXFP4); convert it with mlx-lm to affine quantization first".into(),
        ));
    }
    // Every layer is sparse (no first_k_dense_replace, no mlp_only_layers).
    super::qwen3_moe::build(cfg, w)
}
