//! qwen3: the llama layout with RMS norms on each head's queries and keys
//! (`q_norm`, `k_norm`, applied before rotary embedding) and an explicit head_dim.

use super::config::ModelConfig;
use super::layers::{FeedForward, Mlp, Transformer, Weights};
use super::ModelError;

pub fn build(cfg: &ModelConfig, w: &mut Weights) -> Result<Transformer, ModelError> {
    debug_assert!(cfg.qk_norm);
    super::llama::sanitize(cfg, w);
    Transformer::load(cfg, w, |w, _, p| Ok(FeedForward::Dense(Mlp::load(w, p, false)?)))
}
