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
    /// On the CPU the recurrence runs in [`recurrence_host`], not as MLX ops.
    host: bool,
}

/// Channels of the short convolution: queries, keys and values.
fn conv_dim(c: &LinearAttnConfig) -> i32 {
    2 * c.num_k_heads * c.head_k_dim + c.num_v_heads * c.head_v_dim
}

/// `x * c` with `c` in `x`'s dtype (as a Python float scales an MLX array).
fn scale(x: &Array, c: f32) -> Result<Array, MlxError> {
    Ok(ops::multiply(x, Array::from_f32(c).as_dtype(x.dtype())?)?)
}

impl GatedDeltaNet {
    pub fn load(w: &mut Weights, p: &str, cfg: &ModelConfig, c: &LinearAttnConfig) -> Result<Self, ModelError> {
        let conv = w.take(&format!("{p}.conv1d.weight"))?;
        let conv_dim = conv_dim(c);
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
            host: w.cpu_dense_prefill,
        })
    }

    fn key_dim(&self) -> i32 {
        self.c.num_k_heads * self.c.head_k_dim
    }

    fn conv_dim(&self) -> i32 {
        conv_dim(&self.c)
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
            Some((cs, st)) => {
                // A state from elsewhere (a snapshot file) must be this layer's.
                if cs.shape() != [b, n_keep, self.conv_dim()] || st.shape() != [b, hv, dv, dk] {
                    return Err(MlxError {
                        message: format!("a recurrent state of shapes {:?} and {:?} does not fit this layer ([{b}, {n_keep}, {}], [{b}, {hv}, {dv}, {dk}])", cs.shape(), st.shape(), self.conv_dim()),
                        location: std::panic::Location::caller(),
                    });
                }
                (cs.clone(), st.clone())
            }
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
        // In f64 then rounded, as mlx-lm's Python floats are (for Dk = 128,
        // f32 arithmetic would give 0.0078124995 for 1/128).
        let inv = (dk as f64).powf(-0.5);
        let rms_eps = (1e-6 * inv * inv) as f32;
        let q = scale(&mlx_rs::fast::rms_norm(&q, None, rms_eps)?, (inv * inv) as f32)?;
        let k = scale(&mlx_rs::fast::rms_norm(&k, None, rms_eps)?, inv as f32)?;
        let beta = ops::sigmoid(&beta_in)?;
        // g = exp(-exp(A_log) * softplus(a + dt_bias)), in f32.
        let softplus = ops::logaddexp(ops::add(&a, &self.dt_bias)?, Array::from_f32(0.0).as_dtype(a.dtype())?)?;
        let g = ops::exp(ops::multiply(ops::negative(ops::exp(self.a_log.as_dtype(Dtype::Float32)?)?)?, &softplus)?)?;
        let rep = hv / hk;
        if self.host && super::layers::cpu_kernels_enabled() && q.dtype() == Dtype::Float32 {
            if let Some((y, st)) = self.recurrence(&q, &k, &v, &g, &beta, &rec)? {
                return self.finish(y, &z, new_conv, st, b, s);
            }
        }
        let (y, st) = recurrence_ops(&q, &k, &v, &g, &beta, rec, rep)?;
        self.finish(y, &z, new_conv, st, b, s)
    }

    /// The gated RMS norm (`rms_norm(y) * silu(z)` in f32, back to `y`'s
    /// dtype) and the output projection.
    fn finish(&self, y: Array, z: &Array, conv: Array, st: Array, b: i32, s: i32) -> Result<(Array, Array, Array), MlxError> {
        let c = &self.c;
        let normed = mlx_rs::fast::rms_norm(&y, Some(&self.norm_weight), self.eps)?;
        let gated = ops::multiply(mlx_rs::nn::silu(z.as_dtype(Dtype::Float32)?)?, normed.as_dtype(Dtype::Float32)?)?.as_dtype(y.dtype())?;
        let out = self.out_proj.forward(&gated.reshape(&[b, s, c.num_v_heads * c.head_v_dim])?)?;
        Ok((out, conv, st))
    }

    /// [`recurrence_host`] on MLX's evaluated arrays (f32): `y` `[B, T, Hv,
    /// Dv]` and the new state; `None` if an input is not f32.
    fn recurrence(&self, q: &Array, k: &Array, v: &Array, g: &Array, beta: &Array, state: &Array) -> Result<Option<(Array, Array)>, MlxError> {
        use super::layers::host;
        let (b, t) = (q.shape()[0], q.shape()[1]);
        let (Some(q), Some(k), Some(v), Some(g), Some(beta), Some(mut st)) = (host(q)?, host(k)?, host(v)?, host(g)?, host(beta)?, host(state)?) else {
            return Ok(None);
        };
        let c = &self.c;
        let shape = Shape { b: b as usize, t: t as usize, hk: c.num_k_heads as usize, hv: c.num_v_heads as usize, dk: c.head_k_dim as usize, dv: c.head_v_dim as usize };
        let y = recurrence_host(&q, &k, &v, &g, &beta, &mut st, shape);
        Ok(Some((
            crate::mlx::array_from_vec(y, &[b, t, c.num_v_heads, c.head_v_dim])?,
            crate::mlx::array_from_vec(st, &[b, c.num_v_heads, c.head_v_dim, c.head_k_dim])?,
        )))
    }

    /// One sequence's tokens, continuing and updating its state in `kv`.
    pub fn forward(&self, x: &Array, kv: &mut LayerKv) -> Result<Array, MlxError> {
        let (out, conv, st) = self.run(x, kv.recurrent())?;
        kv.set_recurrent(conv, st, x.shape()[1]);
        Ok(out)
    }

    /// One decode row per sequence (`x`: `[rows, 1, hidden]`, row `i` the
    /// next token of the sequence whose state is `kvs[i]`), each row on its
    /// own state: a row's state then owns its buffers (a slice of a batched
    /// state would keep the whole batch's buffer alive in every snapshot
    /// taken of it, uncounted), and a row computes what it does alone.
    pub fn forward_rows(&self, x: &Array, kvs: &mut [&mut LayerKv]) -> Result<Array, MlxError> {
        let mut outs = Vec::with_capacity(kvs.len());
        for (i, kv) in kvs.iter_mut().enumerate() {
            let i = i as i32;
            outs.push(self.forward(&x.index((i..i + 1, .., ..)), kv)?);
        }
        Ok(ops::concatenate(&outs, 0)?)
    }
}

/// The gated delta rule as mlx-lm's `gated_delta_ops` computes it, an MLX
/// op per term and token: `q`, `k` `[B, T, Hk, Dk]`, `v` `[B, T, Hv, Dv]`, `g`,
/// `beta` `[B, T, Hv]`, `state` `[B, Hv, Dv, Dk]`, `rep = Hv / Hk`. Returns
/// `y` `[B, T, Hv, Dv]` (in `q`'s dtype) and the new state.
pub fn recurrence_ops(q: &Array, k: &Array, v: &Array, g: &Array, beta: &Array, state: Array, rep: i32) -> Result<(Array, Array), MlxError> {
    let s = q.shape()[1];
    let (q, k) = if rep > 1 {
        (Array::repeat_axis::<f32>(q.clone(), rep, -2)?, Array::repeat_axis::<f32>(k.clone(), rep, -2)?)
    } else {
        (q.clone(), k.clone())
    };
    let mut st = state;
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
    Ok((ops::stack(&ys, 1)?, st))
}

/// Sizes of a [`recurrence_host`] call.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub b: usize,
    pub t: usize,
    pub hk: usize,
    pub hv: usize,
    pub dk: usize,
    pub dv: usize,
}

/// `sum(a * b)` with eight partial sums (so the compiler can use vector lanes).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// The gated delta rule over `t` tokens on the CPU, as mlx-lm's ops compute
/// it (`S = S * g; S += k (beta (v - S k)); y = S q`, per head, in f32):
/// one pass over each row of each head's state a token (decay, the row's
/// dot with `k`, its update and its dot with `q`), not an MLX op per step
/// and term. `q`, `k`: `[B, T, Hk, Dk]` (value head `h` reads key head `h /
/// (Hv / Hk)`, as mlx-lm's repeat does); `v`: `[B, T, Hv, Dv]`; `g`, `beta`:
/// `[B, T, Hv]`; `state`: `[B, Hv, Dv, Dk]`, updated in place. Returns `y`,
/// `[B, T, Hv, Dv]`. Heads are spread over the cores.
pub fn recurrence_host(q: &[f32], k: &[f32], v: &[f32], g: &[f32], beta: &[f32], state: &mut [f32], s: Shape) -> Vec<f32> {
    let Shape { b, t, hk, hv, dk, dv } = s;
    let rep = (hv / hk.max(1)).max(1);
    let per_head = dv * dk;
    let run = |bh: usize, st: &mut [f32], y: &mut [f32]| {
        let (bi, h) = (bh / hv, bh % hv);
        let kh = h / rep;
        for ti in 0..t {
            let step = bi * t + ti;
            let (gt, bt) = (g[step * hv + h], beta[step * hv + h]);
            let kt = &k[(step * hk + kh) * dk..][..dk];
            let qt = &q[(step * hk + kh) * dk..][..dk];
            let vt = &v[(step * hv + h) * dv..][..dv];
            let yt = &mut y[ti * dv..][..dv];
            for (i, row) in st.chunks_exact_mut(dk).enumerate() {
                for x in row.iter_mut() {
                    *x *= gt;
                }
                let delta = (vt[i] - dot(row, kt)) * bt;
                for (x, kk) in row.iter_mut().zip(kt) {
                    *x += kk * delta;
                }
                yt[i] = dot(row, qt);
            }
        }
    };
    // Each (batch, head) owns its state and a [T, Dv] block of output.
    let heads = b * hv;
    let mut blocks = vec![0f32; heads * t * dv];
    // Threads only when there is enough to share (a small decode step is cheaper alone).
    let threads = if heads * t * per_head < 1 << 16 { 1 } else { std::thread::available_parallelism().map_or(1, |n| n.get()).min(heads).max(1) };
    let per = heads.div_ceil(threads);
    std::thread::scope(|scope| {
        for (part, (sts, ys)) in state.chunks_mut(per * per_head).zip(blocks.chunks_mut(per * t * dv)).enumerate() {
            let run = &run;
            scope.spawn(move || {
                for (j, (st, y)) in sts.chunks_mut(per_head).zip(ys.chunks_mut(t * dv)).enumerate() {
                    run(part * per + j, st, y);
                }
            });
        }
    });
    // [B, Hv, T, Dv] -> [B, T, Hv, Dv].
    let mut y = vec![0f32; b * t * hv * dv];
    for bh in 0..heads {
        let (bi, h) = (bh / hv, bh % hv);
        for ti in 0..t {
            y[((bi * t + ti) * hv + h) * dv..][..dv].copy_from_slice(&blocks[(bh * t + ti) * dv..][..dv]);
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU recurrence gives what mlx-lm's ops give, with grouped key
    /// heads, a batch of two and a state carried in.
    #[test]
    fn host_recurrence_matches_the_ops() {
        mlx_rs::random::seed(11).unwrap();
        let (b, t, hk, hv, dk, dv) = (2, 7, 2, 4, 32, 16);
        let r = |shape: &[i32]| mlx_rs::random::normal::<f32>(shape, None, None, None).unwrap();
        let (q, k, v) = (r(&[b, t, hk, dk]), r(&[b, t, hk, dk]), r(&[b, t, hv, dv]));
        let g = ops::sigmoid(r(&[b, t, hv])).unwrap();
        let beta = ops::sigmoid(r(&[b, t, hv])).unwrap();
        let state = r(&[b, hv, dv, dk]);
        let (y_ops, st_ops) = recurrence_ops(&q, &k, &v, &g, &beta, state.clone(), hv / hk).unwrap();
        let host = |a: &Array| a.as_slice::<f32>().to_vec();
        for a in [&q, &k, &v, &g, &beta, &state, &y_ops, &st_ops] {
            a.eval().unwrap();
        }
        let mut st = host(&state);
        let shape = Shape { b: b as usize, t: t as usize, hk: hk as usize, hv: hv as usize, dk: dk as usize, dv: dv as usize };
        let y = recurrence_host(&host(&q), &host(&k), &host(&v), &host(&g), &host(&beta), &mut st, shape);
        let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let (dy, ds) = (diff(&y, &host(&y_ops)), diff(&st, &host(&st_ops)));
        let top = |a: &[f32]| a.iter().fold(0f32, |m, x| m.max(x.abs()));
        let (ytop, stop) = (top(&host(&y_ops)), top(&host(&st_ops)));
        // Only the summation order differs: within a few f32 roundings of the values' size.
        assert!(dy <= 4e-6 * ytop && ds <= 4e-6 * stop, "y differs by {dy} (values up to {ytop}), the state by {ds} (up to {stop})");
        assert!(stop > 1.0, "a state that stayed near zero tests nothing");
    }
}
