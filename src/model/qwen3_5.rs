//! qwen3_5 and qwen3_5_moe (Qwen3.5 / 3.6): a hybrid of gated delta-net
//! linear attention ([`super::gated_delta`]) on three layers of four and
//! full attention on every `full_attention_interval`-th, with a per-head
//! output gate, q/k norms and rotary embedding over a quarter of each head.
//! The MoE variant puts experts on every layer, with a shared expert scaled
//! by a sigmoid gate.
//!
//! Weights come as mlx-lm saves them (`language_model.model.layers...`), or
//! as the Hugging Face release names them (`model.language_model...`, a
//! convolution in PyTorch's layout, norms stored as offsets from 1, fused
//! expert projections): both are mapped to one set of names here, as
//! mlx-lm's `sanitize` does. Vision and multi-token-prediction weights are
//! not used.

use mlx_rs::ops::{self, indexing::IndexOp};

use super::config::ModelConfig;
use super::layers::{Transformer, Weights};
use super::ModelError;
use crate::mlx::MlxError;

/// The name kvserve's layers use for a checkpoint's tensor name; `None` for
/// tensors the text model does not use.
fn text_name(k: &str) -> Option<String> {
    if k.starts_with("vision_tower") || k.starts_with("model.visual") || k.contains("mtp.") {
        return None;
    }
    let k = k.strip_prefix("model.language_model.").map(|r| format!("model.{r}")).unwrap_or_else(|| k.to_string());
    Some(k.strip_prefix("language_model.").map(str::to_string).unwrap_or(k))
}

const NORMS: [&str; 5] = [".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight", ".q_norm.weight", ".k_norm.weight"];

pub fn sanitize(cfg: &ModelConfig, w: &mut Weights) -> Result<(), ModelError> {
    let names: Vec<String> = w.names().cloned().collect();
    for k in names {
        let a = w.remove(&k).expect("listed above");
        if let Some(n) = text_name(&k) {
            w.insert(n, a);
        }
    }
    // Per-layer quantization is keyed by the checkpoint's names too.
    let per_layer = std::mem::take(&mut w.quant.per_layer);
    w.quant.per_layer = per_layer.into_iter().filter_map(|(k, v)| text_name(&k).map(|n| (n, v))).collect();
    // The Hugging Face layout: conv1d weights [C, 1, K] and RMS norms kept as `weight - 1`.
    let names: Vec<String> = w.names().cloned().collect();
    let unsanitized = names.iter().any(|k| k.ends_with("conv1d.weight") && w.peek(k).is_some_and(|a| a.shape().last() != Some(&1)));
    if unsanitized {
        for k in &names {
            if k.ends_with("conv1d.weight") {
                let a = w.remove(k).expect("listed");
                w.insert(k.clone(), a.swap_axes(1, 2).map_err(MlxError::from)?);
            } else if NORMS.iter().any(|s| k.ends_with(s)) {
                let a = w.remove(k).expect("listed");
                if a.ndim() == 1 {
                    w.insert(k.clone(), ops::add(&a, mlx_rs::Array::from_f32(1.0).as_dtype(a.dtype()).map_err(MlxError::from)?).map_err(MlxError::from)?);
                } else {
                    w.insert(k.clone(), a);
                }
            }
        }
    }
    // Hugging Face's fused experts: gate_up_proj [E, 2I, D] and down_proj.
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}.mlp");
        if let Some(gu) = w.remove(&format!("{p}.experts.gate_up_proj")) {
            if gu.ndim() != 3 || gu.shape()[1] % 2 != 0 {
                return Err(ModelError::Invalid(format!("{p}.experts.gate_up_proj has shape {:?}; expected [experts, 2 x width, hidden]", gu.shape())));
            }
            let mid = gu.shape()[1] / 2;
            w.insert(format!("{p}.switch_mlp.gate_proj.weight"), gu.index((.., ..mid, ..)));
            w.insert(format!("{p}.switch_mlp.up_proj.weight"), gu.index((.., mid.., ..)));
            let down = w.remove(&format!("{p}.experts.down_proj")).ok_or_else(|| ModelError::MissingTensor(format!("{p}.experts.down_proj")))?;
            w.insert(format!("{p}.switch_mlp.down_proj.weight"), down);
        }
    }
    Ok(())
}

pub fn build(cfg: &ModelConfig, w: &mut Weights) -> Result<Transformer, ModelError> {
    if cfg.linear.is_none() {
        return Err(ModelError::Invalid(format!("{} needs its linear-attention settings", cfg.model_type)));
    }
    sanitize(cfg, w)?;
    if cfg.moe.is_some() {
        super::qwen3_moe::build(cfg, w)
    } else {
        super::llama::build(cfg, w)
    }
}
