//! qwen3: the llama layout with RMS norms on each head's queries and keys
//! (`q_norm`, `k_norm`, applied before rotary embedding) and an explicit head_dim.
//! The config's `qk_norm` carries the difference; the rest is llama's.

use super::config::ModelConfig;
use super::layers::{Transformer, Weights};
use super::ModelError;

pub fn build(cfg: &ModelConfig, w: &mut Weights) -> Result<Transformer, ModelError> {
    debug_assert!(cfg.qk_norm);
    super::llama::build(cfg, w)
}
