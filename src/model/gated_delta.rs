//! Linear attention by the gated delta rule (qwen3_5's `GatedDeltaNet`), as
//! mlx-lm 0.32.2 computes it off Metal: a projection to queries, keys and
//! values through a short causal depthwise convolution, L2-normed queries
//! and keys, then per token and head a state matrix `S` (`[v_dim, k_dim]`)
//! that decays by `g`, is corrected toward `v` along `k` by `beta`, and is
//! read by `q`. The output is RMS-normed, gated by `silu(z)` and projected.
//!
//! Its state between calls is fixed-size (the convolution's last inputs and
//! `S`), kept in the layer's [`LayerKv`] and exact only at its own position:
//! it cannot be trimmed back like keys and values, which is why the prompt
//! cache keeps exact snapshots for these models.

use mlx_rs::ops::{self, indexing::IndexOp};
use mlx_rs::{Array, Dtype};

use super::config::{LinearAttnConfig, ModelConfig};
use super::layers::{Linear, Weights};
use super::ModelError;
use crate::cache::kv::LayerKv;
use crate::mlx::MlxError;

pub struct GatedDeltaNet {
    in_proj_qkv: Linear,
    in_proj_z: Linear,
    in_proj_b: Linear,
    in_proj_a: Linear,
    /// Depthwise convolution weights, `[conv_dim, kernel, 1]` (MLX's layout).
    conv: Array,
    dt_bias: Array,
    a_log: Array,
    norm_weight: Array,
    eps: f32,
    out_proj: Linear,
    c: LinearAttnConfig,
}

/// `x * c` with `c` in `x`'s dtype (as a Python float scales an MLX array).
fn scale(x: &Array, c: f32) -> Result<Array, MlxError> {
    Ok(ops::multiply(x, Array::from_f32(c).as_dtype(x.dtype())?)?)
}

impl GatedDeltaNet {
    pub fn load(w: &mut Weights, p: &str, cfg: &ModelConfig, c: &LinearAttnConfig) -> Result<Self, ModelError> {
        let conv = w.take(&format!("{p}.conv1d.weight"))?;
        let conv_dim = 2 * c.num_k_heads * c.head_k_dim + c.num_v_heads * c.head_v_dim;
        if conv.shape() != [conv_dim, c.conv_kernel, 1] {
            return Err(ModelError::Invalid(format!(
                "{p}.conv1d.weight has shape {:?}; the config needs [{conv_dim}, {}, 1]",
                conv.shape(),
                c.conv_kernel
            )));
        }
        Ok(GatedDeltaNet {
            in_proj_qkv: w.linear(&format!("{p}.in_proj_qkv"), false)?,
            in_proj_z: w.linear(&format!("{p}.in_proj_z"), false)?,
            in_proj_b: w.linear(&format!("{p}.in_proj_b"), false)?,
            in_proj_a: w.linear(&format!("{p}.in_proj_a"), false)?,
            conv,
            dt_bias: w.take(&format!("{p}.dt_bias"))?,
            a_log: w.take(&format!("{p}.A_log"))?,
            norm_weight: w.take(&format!("{p}.norm.weight"))?,
            eps: cfg.rms_norm_eps,
            out_proj: w.linear(&format!("{p}.out_proj"), false)?,
            c: *c,
        })
    }

    fn key_dim(&self) -> i32 {
        self.c.num_k_heads * self.c.head_k_dim
    }

    fn conv_dim(&self) -> i32 {
        2 * self.key_dim() + self.c.num_v_heads * self.c.head_v_dim
    }

    /// `x` (`[B, S, hidden]`) from the state `(conv, S)` (zeros when
    /// `None`); returns the output and the state after these `S` tokens.
    pub fn run(&self, x: &Array, state: Option<(&Array, &Array)>) -> Result<(Array, Array, Array), MlxError> {
        let (b, s) = (x.shape()[0], x.shape()[1]);
        let c = &self.c;
        let (hk, hv, dk, dv) = (c.num_k_heads, c.num_v_heads, c.head_k_dim, c.head_v_dim);
        let qkv = self.in_proj_qkv.forward(x)?;
        let z = self.in_proj_z.forward(x)?.reshape(&[b, s, hv, dv])?;
        let beta_in = self.in_proj_b.forward(x)?;
        let a = self.in_proj_a.forward(x)?;
        let n_keep = c.conv_kernel - 1;
        let (conv_state, rec) = match state {
            Some((cs, st)) => (cs.clone(), st.clone()),
            None => (
                ops::zeros_dtype(&[b, n_keep, self.conv_dim()], x.dtype())?,
                ops::zeros_dtype(&[b, hv, dv, dk], Dtype::Float32)?,
            ),
        };
        let conv_input = ops::concatenate(&[&conv_state, &qkv], 1)?;
        let total = conv_input.shape()[1];
        let new_conv = conv_input.index((.., (total - n_keep).., ..)).contiguous()?;
        let conv_out = mlx_rs::nn::silu(ops::conv1d(&conv_input, &self.conv, 1, 0, 1, self.conv_dim())?)?;
        let kd = self.key_dim();
        let q = conv_out.index((.., .., ..kd)).reshape(&[b, s, hk, dk])?;
        let k = conv_out.index((.., .., kd..2 * kd)).reshape(&[b, s, hk, dk])?;
        let v = conv_out.index((.., .., 2 * kd..)).reshape(&[b, s, hv, dv])?;
        // L2 norms with the readout scale folded into q (mlx-lm's normalize_qk).
        let inv = (dk as f32).powf(-0.5);
        let rms_eps = 1e-6 * inv * inv;
        let q = scale(&mlx_rs::fast::rms_norm(&q, None, rms_eps)?, inv * inv)?;
        let k = scale(&mlx_rs::fast::rms_norm(&k, None, rms_eps)?, inv)?;
        let beta = ops::sigmoid(&beta_in)?;
        // g = exp(-exp(A_log) * softplus(a + dt_bias)), in f32.
        let softplus = ops::logaddexp(ops::add(&a, &self.dt_bias)?, Array::from_f32(0.0).as_dtype(a.dtype())?)?;
        let g = ops::exp(ops::multiply(ops::negative(ops::exp(self.a_log.as_dtype(Dtype::Float32)?)?)?, &softplus)?)?;
        let rep = hv / hk;
        let (q, k) = if rep > 1 {
            (Array::repeat_axis::<f32>(q, rep, -2)?, Array::repeat_axis::<f32>(k, rep, -2)?)
        } else {
            (q, k)
        };
        let mut st = rec;
        let mut ys = Vec::with_capacity(s as usize);
        for t in 0..s {
            let (qt, kt, vt) = (q.index((.., t, .., ..)), k.index((.., t, .., ..)), v.index((.., t, .., ..)));
            let (gt, bt) = (g.index((.., t, ..)), beta.index((.., t, ..)));
            st = ops::multiply(&st, gt.expand_dims_axes(&[-1, -2])?)?;
            let k_row = kt.expand_dims(-2)?;
            let kv_mem = ops::multiply(&st, &k_row)?.sum_axis(-1, None)?;
            let delta = ops::multiply(ops::subtract(&vt, &kv_mem)?, bt.expand_dims(-1)?)?;
            st = ops::add(&st, ops::multiply(&k_row, delta.expand_dims(-1)?)?)?;
            let y = ops::multiply(&st, qt.expand_dims(-2)?)?.sum_axis(-1, None)?;
            ys.push(y.as_dtype(q.dtype())?);
        }
        let y = ops::stack(&ys, 1)?;
        // RMSNormGated: rms_norm(y) * silu(z), in f32, back to y's dtype.
        let normed = mlx_rs::fast::rms_norm(&y, Some(&self.norm_weight), self.eps)?;
        let gated = ops::multiply(mlx_rs::nn::silu(z.as_dtype(Dtype::Float32)?)?, normed.as_dtype(Dtype::Float32)?)?.as_dtype(y.dtype())?;
        let out = self.out_proj.forward(&gated.reshape(&[b, s, hv * dv])?)?;
        Ok((out, new_conv, st))
    }

    /// One sequence's tokens, continuing and updating its state in `kv`.
    pub fn forward(&self, x: &Array, kv: &mut LayerKv) -> Result<Array, MlxError> {
        let (out, conv, st) = self.run(x, kv.recurrent())?;
        kv.set_recurrent(conv, st, x.shape()[1]);
        Ok(out)
    }

    /// One decode row per sequence (`x`: `[rows, 1, hidden]`, row `i` the
    /// next token of the sequence whose state is `kvs[i]`): the rows' states
    /// stacked into one batch, computed together, and split back.
    pub fn forward_rows(&self, x: &Array, kvs: &mut [&mut LayerKv]) -> Result<Array, MlxError> {
        if let [kv] = kvs {
            return self.forward(x, kv);
        }
        let c = &self.c;
        let mut convs = Vec::with_capacity(kvs.len());
        let mut states = Vec::with_capacity(kvs.len());
        for kv in kvs.iter() {
            match kv.recurrent() {
                Some((cs, st)) => {
                    convs.push(cs.clone());
                    states.push(st.clone());
                }
                None => {
                    convs.push(ops::zeros_dtype(&[1, c.conv_kernel - 1, self.conv_dim()], x.dtype())?);
                    states.push(ops::zeros_dtype(&[1, c.num_v_heads, c.head_v_dim, c.head_k_dim], Dtype::Float32)?);
                }
            }
        }
        let (conv, st) = (ops::concatenate(&convs, 0)?, ops::concatenate(&states, 0)?);
        let (out, conv, st) = self.run(x, Some((&conv, &st)))?;
        for (i, kv) in kvs.iter_mut().enumerate() {
            let i = i as i32;
            kv.set_recurrent(conv.index((i..i + 1, .., ..)), st.index((i..i + 1, .., .., ..)), 1);
        }
        Ok(out)
    }
}
