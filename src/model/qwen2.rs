//! qwen2: the llama layout with biases on the q/k/v projections (none on o_proj).
//! The config's `qkv_bias` carries the difference; the rest is llama's.

use super::config::ModelConfig;
use super::layers::{Transformer, Weights};
use super::ModelError;

pub fn build(cfg: &ModelConfig, w: &mut Weights) -> Result<Transformer, ModelError> {
    debug_assert!(cfg.qkv_bias && !cfg.o_bias);
    super::llama::build(cfg, w)
}
