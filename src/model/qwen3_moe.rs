//! qwen3_moe: Qwen3 attention with a sparse mixture of experts in place of the
//! dense MLP. A softmax router picks the top-k experts per token; the experts'
//! stacked (quantized) weights are applied with `gather_qmm`. The same
//! [`SparseMoe`] serves glm4_moe with its sigmoid, group-limited router and a
//! shared expert.

use mlx_rs::ops::{self, indexing::{Ellipsis, IndexOp}};
use mlx_rs::Array;

use super::config::{ExpertActivation, ModelConfig, MoeConfig, Router};
use super::layers::{FeedForward, Linear, LinearWeight, Mlp, Part, Transformer, Weights};
use super::ModelError;
use crate::mlx::MlxError;

/// Experts' weights stacked on a leading axis: `[experts, out, in]`, and
/// their biases `[experts, out]` (gpt_oss).
struct ExpertWeight {
    w: LinearWeight,
    bias: Option<Array>,
}

impl ExpertWeight {
    /// Split by heads ([`super::layers::Shard`]), each rank keeps its `part`
    /// of every expert: gate and up their share of the rows, down the same
    /// share of its columns (so the ranks' outputs sum to the whole).
    fn load(w: &mut Weights, prefix: &str, bias: bool, part: Part) -> Result<Self, ModelError> {
        let m = match w.quantized(prefix)? {
            Some(q) => LinearWeight::Quantized(q),
            None => LinearWeight::Dense(w.take(&format!("{prefix}.weight"))?),
        };
        let bias = if bias { Some(w.take(&format!("{prefix}.bias"))?) } else { None };
        let (m, bias) = w.cut_to_share(prefix, m, bias, part)?;
        Ok(ExpertWeight { w: m, bias })
    }

    /// `x [.., 1, in]` through the experts named by `idx [.., k]` -> `[.., k, 1, out]`.
    fn forward(&self, x: &Array, idx: &Array) -> Result<Array, MlxError> {
        let y = match &self.w {
            LinearWeight::Dense(w) => ops::gather_mm(x, w.swap_axes(-1, -2)?, None, idx, false)?,
            LinearWeight::Quantized(q) => ops::gather_qmm(
                x, &q.packed, &q.scales, &q.biases, None, idx, true, q.group_size, q.bits, false,
            )?,
        };
        match &self.bias {
            Some(b) => Ok(ops::add(&y, b.take_axis(idx, 0)?.expand_dims(-2)?)?),
            None => Ok(y),
        }
    }
}

/// The `k` largest entries along the last axis: (indices, values), in
/// argpartition's order.
fn top_k(a: &Array, k: i32) -> Result<(Array, Array), MlxError> {
    let n = a.shape()[a.ndim() - 1];
    let inds = ops::argpartition_axis(a, n - k, -1)?.index((Ellipsis, (n - k)..));
    let values = a.take_along_axis(&inds, -1)?;
    Ok((inds, values))
}

pub struct SparseMoe {
    gate: Linear,
    gate_proj: ExpertWeight,
    up_proj: ExpertWeight,
    down_proj: ExpertWeight,
    top_k: i32,
    norm_topk_prob: bool,
    activation: ExpertActivation,
    router: Router,
    /// glm4_moe: added to the sigmoid scores to choose experts (not to weigh them).
    correction_bias: Option<Array>,
    /// glm4_moe, qwen3_5_moe: an MLP every token goes through besides its experts.
    shared: Option<Mlp>,
    /// qwen3_5_moe: the shared MLP's output is scaled by `sigmoid(shared_expert_gate(x))`.
    shared_gate: Option<Linear>,
}

impl SparseMoe {
    fn load(w: &mut Weights, p: &str, moe: &MoeConfig) -> Result<Self, ModelError> {
        let experts = format!("{p}.{}", moe.experts_name);
        Ok(SparseMoe {
            gate: w.linear(&format!("{p}.{}", moe.router_name), moe.biases)?,
            gate_proj: ExpertWeight::load(w, &format!("{experts}.gate_proj"), moe.biases, Part::Rows)?,
            up_proj: ExpertWeight::load(w, &format!("{experts}.up_proj"), moe.biases, Part::Rows)?,
            down_proj: ExpertWeight::load(w, &format!("{experts}.down_proj"), moe.biases, Part::Cols)?,
            activation: moe.activation,
            top_k: moe.experts_per_token,
            norm_topk_prob: moe.norm_topk_prob,
            router: moe.router.clone(),
            correction_bias: match moe.router {
                Router::Softmax | Router::TopKSoftmax => None,
                Router::SigmoidGrouped { .. } => Some(w.take(&format!("{p}.gate.e_score_correction_bias"))?),
            },
            shared: if moe.shared_experts > 0 { Some(Mlp::load(w, &format!("{p}.{}", moe.shared_name), false)?) } else { None },
            shared_gate: if moe.shared_gate { Some(w.linear(&format!("{p}.shared_expert_gate"), false)?) } else { None },
        })
    }

    /// The experts each token goes to, `[B, L, k]`, and their weights.
    fn route(&self, x: &Array) -> Result<(Array, Array), MlxError> {
        let logits = self.gate.forward(x)?;
        let n = logits.shape()[logits.ndim() - 1];
        let k = self.top_k;
        match self.router {
            Router::Softmax => {
                let (inds, mut scores) = top_k(&ops::softmax_axis(logits, -1, true)?, k)?;
                if self.norm_topk_prob {
                    scores = ops::divide(&scores, scores.sum_axis(-1, true)?)?;
                }
                Ok((inds, scores))
            }
            Router::TopKSoftmax => {
                let (inds, top) = top_k(&logits, k)?;
                Ok((inds, ops::softmax_axis(top, -1, true)?))
            }
            Router::SigmoidGrouped { n_group, topk_group, routed_scaling_factor } => {
                let orig = ops::sigmoid(logits.as_dtype(mlx_rs::Dtype::Float32)?)?;
                let mut choice = ops::add(&orig, self.correction_bias.as_ref().expect("loaded with the router"))?;
                if n_group > 1 {
                    // Keep the topk_group groups whose two best scores sum highest; zero the rest.
                    let shape = choice.shape().to_vec();
                    let per = n / n_group;
                    let mut grouped_shape = shape[..shape.len() - 1].to_vec();
                    grouped_shape.extend([n_group, per]);
                    let grouped = choice.reshape(&grouped_shape)?;
                    let group_scores = top_k(&grouped, 2)?.1.sum_axis(-1, true)?;
                    let drop = n_group - topk_group;
                    if drop > 0 {
                        let dropped = ops::argpartition_axis(&group_scores, drop - 1, -2)?.index((.., .., ..drop, ..));
                        let grouped = grouped.put_along_axis(&dropped, Array::from_f32(0.0), -2)?;
                        choice = grouped.reshape(&shape)?;
                    }
                }
                let inds = ops::argpartition_axis(&ops::negative(&choice)?, k - 1, -1)?.index((.., .., ..k));
                let mut scores = orig.take_along_axis(&inds, -1)?;
                if k > 1 && self.norm_topk_prob {
                    scores = ops::divide(&scores, scores.sum_axis(-1, true)?)?;
                }
                Ok((inds, ops::multiply(&scores, Array::from_f32(routed_scaling_factor))?))
            }
        }
    }

    pub fn forward(&self, x: &Array) -> Result<Array, MlxError> {
        let (inds, scores) = self.route(x)?;
        // [B, L, D] -> [B, L, 1, 1, D]: one row per (token, expert) pair.
        let xe = x.expand_dims_axes(&[-2, -3])?;
        let g = self.gate_proj.forward(&xe, &inds)?;
        let u = self.up_proj.forward(&xe, &inds)?;
        let h = match self.activation {
            ExpertActivation::Swiglu => ops::multiply(mlx_rs::nn::silu(g)?, u)?,
            ExpertActivation::SwigluOai => {
                let limit = Array::from_f32(7.0);
                let g = ops::minimum(&g, &limit)?;
                let u = ops::clip(&u, (-7.0f32, 7.0f32))?;
                let glu = ops::multiply(&g, ops::sigmoid(ops::multiply(&g, Array::from_f32(1.702))?)?)?;
                ops::multiply(ops::add(&u, Array::from_f32(1.0))?, glu)?
            }
        };
        let y = self.down_proj.forward(&h, &inds)?.squeeze_axes(&[-2])?;
        let y = ops::multiply(&y, scores.expand_dims(-1)?)?.sum_axis(-2, None)?.as_dtype(y.dtype())?;
        match (&self.shared, &self.shared_gate) {
            (Some(m), Some(g)) => Ok(ops::add(&y, ops::multiply(ops::sigmoid(g.forward(x)?)?, m.forward(x)?)?)?),
            (Some(m), None) => Ok(ops::add(&y, m.forward(x)?)?),
            (None, _) => Ok(y),
        }
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

/// A decoder whose sparse layers are [`SparseMoe`] (qwen3_moe, and glm4_moe
/// and gpt_oss after their own checks), the others a dense MLP.
pub fn build(cfg: &ModelConfig, w: &mut Weights) -> Result<Transformer, ModelError> {
    sanitize(cfg, w)?;
    let moe = cfg.moe.clone().expect("config.rs gives every mixture-of-experts model_type a MoE config");
    Transformer::load(cfg, w, |w, i, p| {
        if moe.is_sparse(i) {
            Ok(FeedForward::Moe(Box::new(SparseMoe::load(w, p, &moe)?)))
        } else {
            Ok(FeedForward::Dense(Mlp::load(w, p, false)?))
        }
    })
}
