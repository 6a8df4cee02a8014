//! llama (and SmolLM2, Llama 3 with its rope scaling): pre-norm decoder with
//! grouped-query attention and a SwiGLU MLP; optional biases; tied or untied head.

use super::config::ModelConfig;
use super::layers::{FeedForward, Mlp, Transformer, Weights};
use super::ModelError;

/// Drop what mlx-lm drops: precomputed rotary tables, a tied head's copy.
pub fn sanitize(cfg: &ModelConfig, w: &mut Weights) {
    let stale: Vec<String> = w.names().filter(|k| k.contains("rotary_emb.inv_freq")).cloned().collect();
    for k in stale {
        w.remove(&k);
    }
    if cfg.tie_word_embeddings {
        w.remove("lm_head.weight");
    }
}

pub fn build(cfg: &ModelConfig, w: &mut Weights) -> Result<Transformer, ModelError> {
    sanitize(cfg, w);
    Transformer::load(cfg, w, |w, _, p| Ok(FeedForward::Dense(Mlp::load(w, p, cfg.mlp_bias)?)))
}
