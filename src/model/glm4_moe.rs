//! glm4_moe (GLM-4.5/4.6): attention with biases on q/k/v, optional per-head
//! q/k norms and rotary embedding over part of each head
//! (`partial_rotary_factor`); the first `first_k_dense_replace` layers keep
//! a dense MLP, the rest a mixture of experts with a sigmoid, group-limited
//! router ("noaux_tc") and a shared expert ([`super::qwen3_moe::SparseMoe`]).

use super::config::ModelConfig;
use super::layers::{Transformer, Weights};
use super::ModelError;

pub fn build(cfg: &ModelConfig, w: &mut Weights) -> Result<Transformer, ModelError> {
    // Checkpoints carry multi-token-prediction layers past num_hidden_layers; mlx-lm drops them.
    let extra: Vec<String> = w
        .names()
        .filter(|k| {
            k.strip_prefix("model.layers.")
                .and_then(|r| r.split('.').next())
                .and_then(|n| n.parse::<i32>().ok())
                .is_some_and(|n| n >= cfg.num_layers)
        })
        .cloned()
        .collect();
    for k in extra {
        w.remove(&k);
    }
    super::qwen3_moe::build(cfg, w)
}
