//! Causal attention for a prompt chunk on the CPU, fused: scores, masked
//! softmax and the weighted sum of values computed block by block in cache,
//! as flash attention does, over the f16 KV cache read in place.
//!
//! The unfused way (two BLAS products around a softmax) writes, reads and
//! writes again a score matrix of `heads x chunk x cached` floats per layer:
//! 221 MB for a 512-token chunk at 12K cached tokens of SmolLM2, page faults
//! included, 30 times a chunk. Here each piece of work is one KV head and
//! up to [`QUERIES`] consecutive queries (every query head of the group: `rows =
//! group x queries`), walking the keys it sees in blocks of [`KEYS`], with a
//! running maximum and sum per row (online softmax). Everything a piece
//! touches fits in the core's L2.
//!
//! The layouts keep rows in SIMD lanes: queries `qt[c][row]` (scaled),
//! scores `s[key][row]`, output `ot[c][row]`, so the products broadcast one
//! key or value element against 16 rows, and the softmax's maximum and sums
//! run down columns with no horizontal reductions. Rows are query-major
//! (`row = i * group + r`: query `i` of the piece, head `r` of the group).
//!
//! The inner loops run on AVX-512 or AVX2+FMA+F16C (`x86.rs`); the scalar
//! versions here are their reference. Without either (ARM for now)
//! [`chunk_attention`] declines and the caller keeps MLX's products (BLAS)
//! around a Rust softmax.

use std::sync::OnceLock;

use parking_lot::Mutex;

use crate::kernels::pool::Pool;
use crate::kernels::qmv::widen_f16_here;
use super::{AttnError, KvBuffer, MAX_DIM, MAX_GROUP};

/// Most queries per piece of work (64 measured best for SmolLM2 at 12K
/// cached tokens against 16, 32 and 128); short chunks take fewer, so that
/// every thread gets several pieces.
pub const QUERIES: usize = 64;
/// Keys per block.
pub const KEYS: usize = 64;

/// The inner loops. `rp` (rows, padded to a multiple of 16) is the stride of
/// the row-lane layouts; `kb` (keys in the block) is a multiple of 4.
#[derive(Clone, Copy)]
pub(crate) struct Prims {
    /// `s[j * rp + row] = sum_c kf[j * d + c] * qt[c * rp + row]`.
    pub scores: fn(qt: &[f32], rp: usize, kf: &[f32], kb: usize, d: usize, s: &mut [f32]),
    /// Online softmax over the block: per row, the new maximum `m`, `s`
    /// replaced by `e^(s - m)` (exactly 0 where `s` is `-inf`: masked),
    /// `l` rescaled and added to, `ot` rescaled.
    pub softmax: fn(s: &mut [f32], rp: usize, kb: usize, m: &mut [f32], l: &mut [f32], ot: &mut [f32], d: usize),
    /// `ot[c * rp + row] += sum_j vf[j * d + c] * p[j * rp + row]`.
    pub accumulate: fn(p: &[f32], rp: usize, vf: &[f32], kb: usize, d: usize, ot: &mut [f32]),
}

pub(crate) const SCALAR: Prims = Prims { scores: scores_scalar, softmax: softmax_scalar, accumulate: accumulate_scalar };

/// The inner loops this CPU runs, if any: AVX-512, else AVX2, else none
/// (the caller keeps MLX's BLAS products). `KVSERVE_KERNELS=avx2` or
/// `avx512` asks for one (none if the CPU lacks it), `scalar` or `ref` for
/// the scalar loops (slow: for checking), `mlx` for none.
pub(crate) fn selected_prims() -> Option<Prims> {
    static P: OnceLock<Option<Prims>> = OnceLock::new();
    *P.get_or_init(|| {
        let asked = std::env::var("KVSERVE_KERNELS").unwrap_or_default();
        #[cfg(target_arch = "x86_64")]
        {
            use super::x86::{prefill_avx2, prefill_avx512};
            match asked.as_str() {
                "scalar" | "ref" => Some(SCALAR),
                "mlx" => None,
                "avx2" => prefill_avx2(),
                "avx512" => prefill_avx512(),
                _ => prefill_avx512().or_else(prefill_avx2),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            matches!(asked.as_str(), "scalar" | "ref").then_some(SCALAR)
        }
    })
}

/// Whether [`chunk_attention`] runs on this CPU for these heads (else the
/// caller computes the chunk another way): loops to run, query heads a
/// whole multiple of KV heads (at most [`MAX_GROUP`] a group) and a head
/// dimension that is a multiple of 4, at most [`MAX_DIM`].
pub fn supports(heads: usize, kv_heads: usize, dim: usize) -> bool {
    selected_prims().is_some() && unsupported(heads, kv_heads, dim).is_none()
}

/// Why these heads are not taken, if they are not.
fn unsupported(heads: usize, kvh: usize, d: usize) -> Option<String> {
    if kvh == 0 || heads % kvh != 0 || heads / kvh > MAX_GROUP {
        return Some(format!("{heads} query heads over {kvh} KV heads"));
    }
    if d == 0 || d > MAX_DIM || d % 4 != 0 {
        return Some(format!("head dimension {d} (a multiple of 4, at most {MAX_DIM})"));
    }
    None
}

pub(crate) fn scores_scalar(qt: &[f32], rp: usize, kf: &[f32], kb: usize, d: usize, s: &mut [f32]) {
    for j in 0..kb {
        let srow = &mut s[j * rp..(j + 1) * rp];
        srow.fill(0.0);
        for c in 0..d {
            let k = kf[j * d + c];
            for (x, q) in srow.iter_mut().zip(&qt[c * rp..(c + 1) * rp]) {
                *x += k * q;
            }
        }
    }
}

pub(crate) fn softmax_scalar(s: &mut [f32], rp: usize, kb: usize, m: &mut [f32], l: &mut [f32], ot: &mut [f32], d: usize) {
    for row in 0..rp {
        let mx = (0..kb).map(|j| s[j * rp + row]).fold(m[row], f32::max);
        let corr = crate::kernels::exp_nonpositive(m[row] - mx);
        let mut sum = 0f32;
        for j in 0..kb {
            let x = s[j * rp + row];
            let p = if x == f32::NEG_INFINITY { 0.0 } else { crate::kernels::exp_nonpositive(x - mx) };
            s[j * rp + row] = p;
            sum += p;
        }
        l[row] = l[row] * corr + sum;
        m[row] = mx;
        for c in 0..d {
            ot[c * rp + row] *= corr;
        }
    }
}

pub(crate) fn accumulate_scalar(p: &[f32], rp: usize, vf: &[f32], kb: usize, d: usize, ot: &mut [f32]) {
    for j in 0..kb {
        let prow = &p[j * rp..(j + 1) * rp];
        for c in 0..d {
            let v = vf[j * d + c];
            for (o, x) in ot[c * rp..(c + 1) * rp].iter_mut().zip(prow) {
                *o += v * x;
            }
        }
    }
}

/// `out = softmax(scale * q K^T + causal mask) V` for a chunk of `l`
/// queries at positions `offset..offset + l`, every query head `h` reading
/// KV head `h / (heads / kv_heads)`.
///
/// `q`: `[heads, l, d]` f32; `keys`/`values`: the layer's cache with the
/// chunk's own keys and values already written (`len == offset + l`);
/// `out`: `[l, heads, d]` f32 (token-major, as the output projection reads
/// it). Returns `Ok(false)`, leaving `out` alone, when this CPU has no SIMD
/// version and none was asked for (the caller computes it another way).
#[allow(clippy::too_many_arguments)]
pub fn chunk_attention(q: &[f32], heads: usize, l: usize, offset: usize, keys: &KvBuffer, values: &KvBuffer, scale: f32, out: &mut [f32]) -> Result<bool, AttnError> {
    match selected_prims() {
        Some(p) => chunk_attention_with(p, q, heads, l, offset, keys, values, scale, out).map(|()| true),
        None => Ok(false),
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn chunk_attention_with(
    p: Prims,
    q: &[f32],
    heads: usize,
    l: usize,
    offset: usize,
    keys: &KvBuffer,
    values: &KvBuffer,
    scale: f32,
    out: &mut [f32],
) -> Result<(), AttnError> {
    let bad = |m: String| Err(AttnError::Shape(format!("chunk attention: {m}")));
    let (kvh, d) = (keys.heads, keys.dim);
    if (values.heads, values.dim, values.len, values.capacity) != (kvh, d, keys.len, keys.capacity) {
        return bad("keys and values differ in layout".into());
    }
    if let Some(why) = unsupported(heads, kvh, d) {
        return bad(why);
    }
    if l == 0 || keys.len != offset + l || keys.len > keys.capacity {
        return bad(format!("{l} queries at {offset} over {} cached tokens (capacity {})", keys.len, keys.capacity));
    }
    let buf = kvh.checked_mul(keys.capacity).and_then(|n| n.checked_mul(d));
    if buf != Some(keys.data.len()) || buf != Some(values.data.len()) {
        return bad(format!("buffers of {} and {} values for [{kvh}, {}, {d}]", keys.data.len(), values.data.len(), keys.capacity));
    }
    if q.len() != heads * l * d || out.len() != heads * l * d {
        return bad(format!("q {} and out {} values for {heads} heads x {l} queries x {d}", q.len(), out.len()));
    }
    let g = heads / kvh;
    let pool = Pool::global(crate::kernels::qmv::MAX_THREADS);
    let per = (l * kvh).div_ceil(4 * pool.threads()).clamp(8, QUERIES);
    let pieces_per_head = l.div_ceil(per);
    let pieces = kvh * pieces_per_head;
    let results: Vec<Mutex<Vec<f32>>> = (0..pieces).map(|_| Mutex::new(Vec::new())).collect();
    // Piece t: KV head and first query. The last queries see the most
    // keys: they are handed out first.
    let place = |t: usize| (t % kvh, (pieces_per_head - 1 - t / kvh) * per);
    let run = |t: usize| {
        let (h, q0) = place(t);
        *results[t].lock() = piece(p, q, l, d, g, h, q0, per.min(l - q0), offset, keys, values, scale);
    };
    if !(pieces > 1 && pool.threads() > 1 && pool.run(pieces, &run)) {
        (0..pieces).for_each(run);
    }
    for (t, r) in results.iter().enumerate() {
        let (h, q0) = place(t);
        for (i, rows) in r.lock().chunks_exact(g * d).enumerate() {
            let at = ((q0 + i) * heads + h * g) * d;
            out[at..at + g * d].copy_from_slice(rows);
        }
    }
    Ok(())
}

/// One piece: queries `q0..q0 + nq` of every query head of KV head `h`.
/// Returns their outputs `[nq, g, d]`.
#[allow(clippy::too_many_arguments)]
fn piece(p: Prims, q: &[f32], l: usize, d: usize, g: usize, h: usize, q0: usize, nq: usize, offset: usize, keys: &KvBuffer, values: &KvBuffer, scale: f32) -> Vec<f32> {
    let rows = g * nq;
    let rp = rows.next_multiple_of(16);
    let mut qt = vec![0f32; d * rp];
    for i in 0..nq {
        for r in 0..g {
            let src = &q[((h * g + r) * l + q0 + i) * d..][..d];
            for (c, &x) in src.iter().enumerate() {
                qt[c * rp + i * g + r] = x * scale;
            }
        }
    }
    let mut ot = vec![0f32; d * rp];
    let mut m = vec![f32::NEG_INFINITY; rp];
    let mut sum = vec![0f32; rp];
    let mut s = vec![0f32; KEYS * rp];
    let mut kf = vec![0f32; KEYS * d];
    let mut vf = vec![0f32; KEYS * d];
    // Row i sees keys 0..=offset + q0 + i; the piece as a whole 0..end.
    let end = offset + q0 + nq;
    let mut j0 = 0;
    while j0 < end {
        let kb = KEYS.min(end - j0);
        let kb4 = kb.next_multiple_of(4);
        widen_f16_here(keys.rows(h, j0, j0 + kb), &mut kf[..kb * d]);
        widen_f16_here(values.rows(h, j0, j0 + kb), &mut vf[..kb * d]);
        kf[kb * d..kb4 * d].fill(0.0);
        vf[kb * d..kb4 * d].fill(0.0);
        (p.scores)(&qt, rp, &kf[..kb4 * d], kb4, d, &mut s[..kb4 * rp]);
        if j0 + kb4 > offset + q0 + 1 {
            // The diagonal (or padding keys): mask what each row may not see.
            for j in 0..kb4 {
                let key = j0 + j;
                if key < offset + q0 + 1 {
                    continue;
                }
                for (row, x) in s[j * rp..(j + 1) * rp].iter_mut().enumerate() {
                    if key >= end || key > offset + q0 + row / g {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
        }
        (p.softmax)(&mut s[..kb4 * rp], rp, kb4, &mut m, &mut sum, &mut ot, d);
        (p.accumulate)(&s[..kb4 * rp], rp, &vf[..kb4 * d], kb4, d, &mut ot);
        j0 += kb;
    }
    let mut res = vec![0f32; rows * d];
    for row in 0..rows {
        let inv = 1.0 / sum[row];
        for c in 0..d {
            res[row * d + c] = ot[c * rp + row] * inv;
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;
    use crate::kernels::attn::tests::Rng;

    /// Plain causal attention in f64 over the f16 cache: `[l, heads, d]`.
    #[allow(clippy::too_many_arguments)]
    fn reference(q: &[f32], heads: usize, l: usize, offset: usize, kvh: usize, cap: usize, d: usize, k: &[u16], v: &[u16], scale: f32) -> Vec<f32> {
        let g = heads / kvh;
        let w = |b: &[u16], h: usize, j: usize, c: usize| f16::from_bits(b[(h * cap + j) * d + c]).to_f64();
        let mut out = vec![0f32; l * heads * d];
        for qh in 0..heads {
            let h = qh / g;
            for i in 0..l {
                let seen = offset + i + 1;
                let s: Vec<f64> = (0..seen)
                    .map(|j| (0..d).map(|c| q[(qh * l + i) * d + c] as f64 * w(k, h, j, c)).sum::<f64>() * scale as f64)
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..d {
                    out[(i * heads + qh) * d + c] = ((0..seen).map(|j| e[j] * w(v, h, j, c)).sum::<f64>() / z) as f32;
                }
            }
        }
        out
    }

    fn prims() -> Vec<(&'static str, Prims)> {
        let mut all = vec![("scalar", SCALAR)];
        #[cfg(target_arch = "x86_64")]
        if let Some(p) = crate::kernels::attn::x86::prefill_avx512() {
            all.push(("avx512", p));
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(p) = crate::kernels::attn::x86::prefill_avx2() {
            all.push(("avx2", p));
        }
        all
    }

    /// (heads, kv heads, head dim, queries, offset)
    const CASES: &[(usize, usize, usize, usize, usize)] = &[
        (9, 3, 64, 37, 0),     // SmolLM2's heads; a first chunk, not a multiple of QUERIES
        (9, 3, 64, 16, 200),   // a chunk on a cached prefix that is not a multiple of KEYS
        (4, 4, 32, 5, 3),      // no grouping, a short chunk
        (14, 2, 128, 33, 130), // 7 heads a group (rows not a multiple of 16)
        (16, 8, 128, 64, 64),
        (2, 1, 8, 2, 0),       // the smallest: 2 queries, 2 heads of 8
        (6, 2, 80, 20, 1000),  // a long prefix, several blocks before the diagonal
    ];

    #[test]
    fn matches_an_f64_reference_on_every_path() {
        for (n, &(heads, kvh, d, l, offset)) in CASES.iter().enumerate() {
            let mut rng = Rng(0x9e37_79b9 + n as u64);
            let t = offset + l;
            let cap = t + 7; // room past the tokens, filled with garbage that must not be read
            let q: Vec<f32> = (0..heads * l * d).map(|_| rng.next()).collect();
            let k: Vec<u16> = (0..kvh * cap * d).map(|_| f16::from_f32(rng.next()).to_bits()).collect();
            let mut v: Vec<u16> = (0..kvh * cap * d).map(|_| f16::from_f32(rng.next()).to_bits()).collect();
            for h in 0..kvh {
                for j in t..cap {
                    for c in 0..d {
                        v[(h * cap + j) * d + c] = f16::from_f32(1e4).to_bits();
                    }
                }
            }
            let scale = (d as f32).powf(-0.5);
            let want = reference(&q, heads, l, offset, kvh, cap, d, &k, &v, scale);
            let keys = KvBuffer { data: &k, heads: kvh, capacity: cap, len: t, dim: d };
            let values = KvBuffer { data: &v, ..keys };
            for (name, p) in prims() {
                let mut out = vec![f32::NAN; heads * l * d];
                chunk_attention_with(p, &q, heads, l, offset, &keys, &values, scale, &mut out).unwrap();
                let err = out.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(err < 2e-5, "{name}: case {n} ({heads}/{kvh} heads of {d}, {l} queries at {offset}): max error {err}");
            }
        }
    }

    #[test]
    fn the_simd_loops_agree_with_the_scalar_ones() {
        // The same blocks in the same order: only rounding (FMA) differs.
        let all = prims();
        if all.len() == 1 {
            eprintln!("no SIMD version for this CPU: only the scalar path ran");
        }
        for (name, simd) in all.into_iter().skip(1) {
            let mut rng = Rng(7);
            let (heads, kvh, d, l, offset) = (9, 3, 64, 100, 500);
            let (t, cap) = (offset + l, offset + l);
            let q: Vec<f32> = (0..heads * l * d).map(|_| rng.next() * 3.0).collect();
            let k: Vec<u16> = (0..kvh * cap * d).map(|_| f16::from_f32(rng.next()).to_bits()).collect();
            let v: Vec<u16> = (0..kvh * cap * d).map(|_| f16::from_f32(rng.next()).to_bits()).collect();
            let keys = KvBuffer { data: &k, heads: kvh, capacity: cap, len: t, dim: d };
            let values = KvBuffer { data: &v, ..keys };
            let (mut a, mut b) = (vec![0f32; heads * l * d], vec![0f32; heads * l * d]);
            chunk_attention_with(SCALAR, &q, heads, l, offset, &keys, &values, 0.125, &mut a).unwrap();
            chunk_attention_with(simd, &q, heads, l, offset, &keys, &values, 0.125, &mut b).unwrap();
            let err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(err < 1e-5, "{name}: max difference {err}");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let k = vec![0u16; 2 * 10 * 8];
        let keys = KvBuffer { data: &k, heads: 2, capacity: 10, len: 6, dim: 8 };
        let q = vec![0f32; 4 * 2 * 8];
        let mut out = vec![0f32; 4 * 2 * 8];
        // 2 queries at 3 need 5 tokens in the cache, not 6.
        assert!(chunk_attention_with(SCALAR, &q, 4, 2, 3, &keys, &keys, 1.0, &mut out).is_err());
        assert!(chunk_attention_with(SCALAR, &q, 4, 2, 4, &keys, &keys, 1.0, &mut out).is_ok());
        // 3 query heads over 2 KV heads.
        assert!(chunk_attention_with(SCALAR, &q[..3 * 2 * 8], 3, 2, 4, &keys, &keys, 1.0, &mut out[..3 * 2 * 8]).is_err());
        // An output of the wrong size.
        assert!(chunk_attention_with(SCALAR, &q, 4, 2, 4, &keys, &keys, 1.0, &mut out[..8]).is_err());
        // A head dimension that is not a multiple of 4.
        let k6 = vec![0u16; 2 * 10 * 6];
        let keys6 = KvBuffer { data: &k6, heads: 2, capacity: 10, len: 6, dim: 6 };
        assert!(chunk_attention_with(SCALAR, &q[..4 * 2 * 6], 4, 2, 4, &keys6, &keys6, 1.0, &mut out[..4 * 2 * 6]).is_err());
    }
}
