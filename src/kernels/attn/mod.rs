//! Attention for one decode row on the CPU, over a KV cache stored in f16.
//!
//! Each KV head's query group (the query heads that share it) is computed
//! together, so every cached key and value is read from memory once per step
//! whatever the group size. Long caches are cut into blocks of
//! [`BLOCK`] tokens computed on the thread pool, each leaving a partial
//! softmax (its maximum, its sum and its weighted values) that are merged at
//! the end, as flash-decoding does. Scores go through the same
//! branch-free `exp` as the prefill softmax.
//!
//! The dot products and value sums run on AVX2 + FMA + F16C where the CPU
//! has them (`x86.rs`), else on the scalar reference here.

use std::sync::OnceLock;

use parking_lot::Mutex;

use super::pool::Pool;
use super::qmv::f16_to_f32;

pub mod prefill;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86;

#[cfg(test)]
mod tests;

/// Tokens per block of work.
pub const BLOCK: usize = 512;
/// Below this many cached tokens times KV heads, one thread does it all
/// (handing blocks to the pool costs more than it saves).
const PARALLEL_MIN: usize = 1024;
/// Largest head dimension handled (the per-row scratch lives on the stack).
pub const MAX_DIM: usize = 256;
/// Largest query group (query heads per KV head).
pub const MAX_GROUP: usize = 16;

/// A KV cache layer's keys or values as MLX lays them out:
/// `[kv_heads, capacity, dim]` f16 bits, of which the first `len` tokens of
/// each head are valid.
#[derive(Clone, Copy)]
pub struct KvBuffer<'a> {
    pub data: &'a [u16],
    pub heads: usize,
    pub capacity: usize,
    pub len: usize,
    pub dim: usize,
}

impl<'a> KvBuffer<'a> {
    /// Tokens `j0..j1` of head `h`, back to back.
    fn rows(&self, h: usize, j0: usize, j1: usize) -> &'a [u16] {
        let start = (h * self.capacity + j0) * self.dim;
        &self.data[start..start + (j1 - j0) * self.dim]
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AttnError {
    #[error("decode attention: {0}")]
    Shape(String),
}

/// The dispatched primitives.
#[derive(Clone, Copy)]
struct Prims {
    /// `scores[r * n + j] = scale * q_r . k_j` for `q: [g, d]`, `k: [n, d]` f16.
    scores: fn(q: &[f32], g: usize, k: &[u16], d: usize, scale: f32, scores: &mut [f32]),
    /// `acc[r] += sum_j p[r * n + j] * v_j` for `v: [n, d]` f16, `acc: [g, d]`.
    accumulate: fn(p: &[f32], g: usize, v: &[u16], d: usize, acc: &mut [f32]),
}

const SCALAR: Prims = Prims { scores: scores_scalar, accumulate: accumulate_scalar };

fn prims() -> Prims {
    static P: OnceLock<Prims> = OnceLock::new();
    *P.get_or_init(|| {
        if matches!(std::env::var("KVSERVE_KERNELS").as_deref(), Ok("scalar" | "ref")) {
            return SCALAR;
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(p) = x86::avx2() {
            return p;
        }
        SCALAR
    })
}

/// Whether the SIMD primitives are in use (else the scalar reference).
pub fn simd() -> bool {
    prims().scores as usize != SCALAR.scores as usize
}

fn scores_scalar(q: &[f32], g: usize, k: &[u16], d: usize, scale: f32, scores: &mut [f32]) {
    let n = k.len() / d;
    for (j, kr) in k.chunks_exact(d).enumerate() {
        for r in 0..g {
            let qr = &q[r * d..(r + 1) * d];
            let dot: f32 = qr.iter().zip(kr).map(|(a, &b)| a * f16_to_f32(b)).sum();
            scores[r * n + j] = dot * scale;
        }
    }
}

fn accumulate_scalar(p: &[f32], g: usize, v: &[u16], d: usize, acc: &mut [f32]) {
    let n = v.len() / d;
    let mut row = [0f32; MAX_DIM];
    for (j, vr) in v.chunks_exact(d).enumerate() {
        for (x, &h) in row.iter_mut().zip(vr) {
            *x = f16_to_f32(h);
        }
        for r in 0..g {
            let w = p[r * n + j];
            for (a, x) in acc[r * d..(r + 1) * d].iter_mut().zip(&row[..d]) {
                *a += w * x;
            }
        }
    }
}

/// A block's softmax state for each query of its group: running maximum,
/// sum of `e^(s - max)`, and `sum e^(s - max) v` (`[g, d]`).
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

/// `out[h] = softmax(scale * q_h K^T) V` for every query head `h` of one
/// decode row, over the cached tokens of `keys`/`values` followed by the
/// row's own key and value (`new_k`, `new_v`: `[kv_heads, dim]` f16 bits).
/// `q` and `out` are `[heads, dim]` f32; query head `h` reads KV head
/// `h / (heads / kv_heads)`, as MLX's grouped attention does.
pub fn decode_attention(
    q: &[f32],
    heads: usize,
    keys: &KvBuffer,
    values: &KvBuffer,
    new_k: &[u16],
    new_v: &[u16],
    scale: f32,
    out: &mut [f32],
) -> Result<(), AttnError> {
    decode_attention_with(prims(), q, heads, keys, values, new_k, new_v, scale, out)
}

fn validate(q: &[f32], heads: usize, k: &KvBuffer, v: &KvBuffer, new_k: &[u16], new_v: &[u16], out: &[f32]) -> Result<(), AttnError> {
    let bad = |m: String| Err(AttnError::Shape(m));
    let (kvh, d) = (k.heads, k.dim);
    if (v.heads, v.dim, v.len, v.capacity) != (kvh, d, k.len, k.capacity) {
        return bad("keys and values differ in layout".into());
    }
    if kvh == 0 || heads % kvh != 0 || heads / kvh > MAX_GROUP {
        return bad(format!("{heads} query heads over {kvh} KV heads"));
    }
    if d == 0 || d > MAX_DIM {
        return bad(format!("head dimension {d} (at most {MAX_DIM})"));
    }
    if k.len > k.capacity {
        return bad(format!("{} tokens in a buffer of {}", k.len, k.capacity));
    }
    let buf = kvh.checked_mul(k.capacity).and_then(|n| n.checked_mul(d));
    if buf != Some(k.data.len()) || buf != Some(v.data.len()) {
        return bad(format!("buffers of {} and {} values for [{kvh}, {}, {d}]", k.data.len(), v.data.len(), k.capacity));
    }
    if q.len() != heads * d || out.len() != heads * d || new_k.len() != kvh * d || new_v.len() != kvh * d {
        return bad(format!("q {}, out {}, new key {}, new value {} values for {heads} heads of {d}", q.len(), out.len(), new_k.len(), new_v.len()));
    }
    Ok(())
}

/// One decode row's attention (see [`decode_attention`]): its query, its
/// own cache, its own new key and value, and where its output goes.
pub struct Row<'a> {
    pub q: &'a [f32],
    pub keys: KvBuffer<'a>,
    pub values: KvBuffer<'a>,
    pub new_k: &'a [u16],
    pub new_v: &'a [u16],
    pub out: &'a mut [f32],
}

/// [`decode_attention`] for several rows, each over its own cache (the
/// sequences of a batched decode step), in one hand-out to the thread
/// pool: each row's result is the same as alone (the same blocks, merged
/// the same way), and short caches that one row would not split across
/// threads are split across rows.
pub fn decode_attention_rows(heads: usize, scale: f32, rows: &mut [Row]) -> Result<(), AttnError> {
    rows_with(prims(), heads, scale, rows)
}

#[allow(clippy::too_many_arguments)]
fn decode_attention_with(
    p: Prims,
    q: &[f32],
    heads: usize,
    keys: &KvBuffer,
    values: &KvBuffer,
    new_k: &[u16],
    new_v: &[u16],
    scale: f32,
    out: &mut [f32],
) -> Result<(), AttnError> {
    rows_with(p, heads, scale, &mut [Row { q, keys: *keys, values: *values, new_k, new_v, out }])
}

fn rows_with(p: Prims, heads: usize, scale: f32, rows: &mut [Row]) -> Result<(), AttnError> {
    for r in rows.iter() {
        validate(r.q, heads, &r.keys, &r.values, r.new_k, r.new_v, r.out)?;
    }
    // Row i's blocks are work items first[i] .. first[i + 1], KV head major;
    // each KV head's last block also takes the row's own token.
    let blocks: Vec<usize> = rows.iter().map(|r| r.keys.len.div_ceil(BLOCK).max(1)).collect();
    let mut first = vec![0usize];
    for (r, b) in rows.iter().zip(&blocks) {
        first.push(first.last().copied().unwrap_or(0) + r.keys.heads * b);
    }
    let chunks = *first.last().unwrap_or(&0);
    let partials: Vec<Mutex<Option<Partial>>> = (0..chunks).map(|_| Mutex::new(None)).collect();
    let run = |c: usize| {
        let i = first.partition_point(|&f| f <= c) - 1;
        let (r, nb) = (&rows[i], blocks[i]);
        let (kvh, d, t) = (r.keys.heads, r.keys.dim, r.keys.len);
        let g = heads / kvh;
        let (h, b) = ((c - first[i]) / nb, (c - first[i]) % nb);
        let (j0, j1) = (b * BLOCK, ((b + 1) * BLOCK).min(t));
        let qg = &r.q[h * g * d..(h + 1) * g * d];
        let own = (b + 1 == nb).then(|| (&r.new_k[h * d..(h + 1) * d], &r.new_v[h * d..(h + 1) * d]));
        *partials[c].lock() = Some(block(p, qg, g, d, scale, r.keys.rows(h, j0, j1), r.values.rows(h, j0, j1), own));
    };
    let work: usize = rows.iter().map(|r| r.keys.len * r.keys.heads).sum();
    let pool = Pool::global(super::qmv::MAX_THREADS);
    let parallel = chunks > 1 && work >= PARALLEL_MIN && pool.threads() > 1;
    if !(parallel && pool.run(chunks, &run)) {
        (0..chunks).for_each(run);
    }
    // Merge each row's head groups' blocks.
    for (i, r) in rows.iter_mut().enumerate() {
        let (kvh, d, nb) = (r.keys.heads, r.keys.dim, blocks[i]);
        let g = heads / kvh;
        for h in 0..kvh {
            let parts: Vec<Partial> = (0..nb).filter_map(|b| partials[first[i] + h * nb + b].lock().take()).collect();
            for q in 0..g {
                let m = parts.iter().map(|pt| pt.max[q]).fold(f32::NEG_INFINITY, f32::max);
                let o = &mut r.out[(h * g + q) * d..(h * g + q + 1) * d];
                o.fill(0.0);
                let mut total = 0f32;
                for pt in &parts {
                    let w = crate::kernels::exp_nonpositive(pt.max[q] - m);
                    total += w * pt.sum[q];
                    for (x, a) in o.iter_mut().zip(&pt.acc[q * d..(q + 1) * d]) {
                        *x += w * a;
                    }
                }
                let inv = 1.0 / total;
                o.iter_mut().for_each(|x| *x *= inv);
            }
        }
    }
    Ok(())
}

/// One block: scores of `g` queries against `k` (and the row's own key),
/// their exponentials against the block's maximum, and the weighted values.
#[allow(clippy::too_many_arguments)]
fn block(p: Prims, q: &[f32], g: usize, d: usize, scale: f32, k: &[u16], v: &[u16], own: Option<(&[u16], &[u16])>) -> Partial {
    let n = k.len() / d;
    // Scores `[g, n]` for the cached tokens; the row's own token apart.
    let mut s = vec![0f32; g * n];
    (p.scores)(q, g, k, d, scale, &mut s);
    let mut own_s = [f32::NEG_INFINITY; MAX_GROUP];
    if let Some((ok, _)) = own {
        (p.scores)(q, g, ok, d, scale, &mut own_s[..g]);
    }
    let mut max = vec![f32::NEG_INFINITY; g];
    let mut sum = vec![0f32; g];
    for r in 0..g {
        let row = &mut s[r * n..(r + 1) * n];
        let m = row.iter().copied().fold(own_s[r], f32::max);
        let mut total = crate::kernels::exp_shifted_sum(row, m);
        if own.is_some() {
            own_s[r] = crate::kernels::exp_nonpositive(own_s[r] - m);
            total += own_s[r];
        }
        max[r] = m;
        sum[r] = total;
    }
    let mut acc = vec![0f32; g * d];
    if n > 0 {
        (p.accumulate)(&s, g, v, d, &mut acc);
    }
    if let Some((_, ov)) = own {
        (p.accumulate)(&own_s[..g], g, ov, d, &mut acc);
    }
    Partial { max, sum, acc }
}
