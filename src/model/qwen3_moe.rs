//! qwen3_moe: Qwen3 attention with a sparse mixture of experts in place of the
//! dense MLP. A softmax router picks the top-k experts per token; the experts'
//! stacked (quantized) weights are applied with `gather_qmm`.

use mlx_rs::ops::{self, indexing::IndexOp};
use mlx_rs::Array;

use super::config::{ModelConfig, MoeConfig};
use super::layers::{FeedForward, Linear, Mlp, Transformer, Weights};
use super::ModelError;
use crate::mlx::{MlxError, QuantizedMatrix};

/// Experts' weights stacked on a leading axis: `[experts, out, in]`.
enum ExpertWeight {
    Dense(Array),
    Quantized(QuantizedMatrix),
}

impl ExpertWeight {
    fn load(w: &mut Weights, prefix: &str) -> Result<Self, ModelError> {
        Ok(match w.quantized(prefix)? {
            Some(q) => ExpertWeight::Quantized(q),
            None => ExpertWeight::Dense(w.take(&format!("{prefix}.weight"))?),
        })
    }

    /// `x [.., 1, in]` through the experts named by `idx [.., k]` -> `[.., k, 1, out]`.
    fn forward(&self, x: &Array, idx: &Array) -> Result<Array, MlxError> {
        Ok(match self {
            ExpertWeight::Dense(w) => ops::gather_mm(x, w.swap_axes(-1, -2)?, None, idx, false)?,
            ExpertWeight::Quantized(q) => ops::gather_qmm(
                x, &q.packed, &q.scales, &q.biases, None, idx, true, q.group_size, q.bits, false,
            )?,
        })
    }
}

pub struct SparseMoe {
    gate: Linear,
    gate_proj: ExpertWeight,
    up_proj: ExpertWeight,
    down_proj: ExpertWeight,
    top_k: i32,
    norm_topk_prob: bool,
}

impl SparseMoe {
    fn load(w: &mut Weights, p: &str, moe: &MoeConfig) -> Result<Self, ModelError> {
        Ok(SparseMoe {
            gate: w.linear(&format!("{p}.gate"), false)?,
            gate_proj: ExpertWeight::load(w, &format!("{p}.switch_mlp.gate_proj"))?,
            up_proj: ExpertWeight::load(w, &format!("{p}.switch_mlp.up_proj"))?,
            down_proj: ExpertWeight::load(w, &format!("{p}.switch_mlp.down_proj"))?,
            top_k: moe.experts_per_token,
            norm_topk_prob: moe.norm_topk_prob,
        })
    }

    pub fn forward(&self, x: &Array) -> Result<Array, MlxError> {
        let gates = ops::softmax_axis(self.gate.forward(x)?, -1, true)?;
        let n = gates.shape()[gates.ndim() - 1];
        let k = self.top_k;
        let inds = ops::argpartition_axis(&gates, n - k, -1)?.index((.., .., (n - k)..));
        let mut scores = gates.take_along_axis(&inds, -1)?;
        if self.norm_topk_prob {
            scores = ops::divide(&scores, scores.sum_axis(-1, true)?)?;
        }
        // [B, L, D] -> [B, L, 1, 1, D]: one row per (token, expert) pair.
        let xe = x.expand_dims_axes(&[-2, -3])?;
        let g = self.gate_proj.forward(&xe, &inds)?;
        let u = self.up_proj.forward(&xe, &inds)?;
        let h = ops::multiply(mlx_rs::nn::silu(g)?, u)?;
        let y = self.down_proj.forward(&h, &inds)?.squeeze_axes(&[-2])?;
        Ok(ops::multiply(&y, scores.expand_dims(-1)?)?.sum_axis(-2, None)?)
    }
}

/// Hugging Face checkpoints keep one tensor per expert; stack them as
/// `switch_mlp.{gate,up,down}_proj` (MLX-format directories already are).
pub fn sanitize(cfg: &ModelConfig, w: &mut Weights) -> Result<(), ModelError> {
    let moe = cfg.moe.as_ref().expect("qwen3_moe config");
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}.mlp");
        if !w.contains(&format!("{p}.experts.0.up_proj.weight")) {
            continue;
        }
        for n in ["up_proj", "down_proj", "gate_proj"] {
            let mut parts = Vec::with_capacity(moe.num_experts as usize);
            for e in 0..moe.num_experts {
                let name = format!("{p}.experts.{e}.{n}.weight");
                parts.push(w.remove(&name).ok_or(ModelError::MissingTensor(name))?);
            }
            w.insert(format!("{p}.switch_mlp.{n}.weight"), ops::stack(&parts, 0).map_err(MlxError::from)?);
        }
    }
    if cfg.tie_word_embeddings {
        w.remove("lm_head.weight");
    }
    Ok(())
}

pub fn build(cfg: &ModelConfig, w: &mut Weights) -> Result<Transformer, ModelError> {
    sanitize(cfg, w)?;
    let moe = cfg.moe.clone().expect("qwen3_moe config");
    Transformer::load(cfg, w, |w, i, p| {
        if moe.is_sparse(i) {
            Ok(FeedForward::Moe(SparseMoe::load(w, p, &moe)?))
        } else {
            Ok(FeedForward::Dense(Mlp::load(w, p, false)?))
        }
    })
}
