//! Decode attention's inner loops on AVX2 + FMA + F16C: f16 keys and values
//! widened eight at a time (`vcvtph2ps`), products accumulated in f32.

use std::arch::x86_64::*;

use super::{accumulate_scalar, scores_scalar, Prims, MAX_DIM};

/// The AVX2 primitives, when this CPU has AVX2, FMA and F16C.
pub(super) fn avx2() -> Option<Prims> {
    (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c"))
        .then_some(Prims { scores, accumulate })
}

fn scores(q: &[f32], g: usize, k: &[u16], d: usize, scale: f32, out: &mut [f32]) {
    let n = k.len() / d;
    if d % 8 != 0 || d > MAX_DIM || q.len() < g * d || out.len() < g * n || k.len() != n * d {
        return scores_scalar(q, g, k, d, scale, out);
    }
    // SAFETY: only `avx2()` hands this fn out, after detecting AVX2, FMA and
    // F16C; the lengths the loops index by were checked just above.
    unsafe { scores_avx2(q, g, k, d, scale, out) }
}

fn accumulate(p: &[f32], g: usize, v: &[u16], d: usize, acc: &mut [f32]) {
    let n = v.len() / d;
    if d % 8 != 0 || d > MAX_DIM || p.len() < g * n || acc.len() < g * d || v.len() != n * d {
        return accumulate_scalar(p, g, v, d, acc);
    }
    // SAFETY: as in `scores`.
    unsafe { accumulate_avx2(p, g, v, d, acc) }
}

/// Sum of the eight lanes.
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Widens one f16 row of `d` (a multiple of 8, at most `MAX_DIM`) into `dst`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen(src: *const u16, d: usize, dst: &mut [f32; MAX_DIM]) {
    let mut c = 0;
    while c < d {
        // SAFETY: the caller guarantees `d` readable values at `src`; `c + 8 <= d <= MAX_DIM`.
        let h = unsafe { _mm_loadu_si128(src.add(c) as *const __m128i) };
        unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add(c), _mm256_cvtph_ps(h)) };
        c += 8;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_avx2(q: &[f32], g: usize, k: &[u16], d: usize, scale: f32, out: &mut [f32]) {
    let n = k.len() / d;
    let mut kf = [0f32; MAX_DIM];
    for j in 0..n {
        // SAFETY: row j lies inside `k` (n * d values, checked by the caller).
        unsafe { widen(k.as_ptr().add(j * d), d, &mut kf) };
        for r in 0..g {
            let qr = q[r * d..(r + 1) * d].as_ptr();
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut c = 0;
            while c + 16 <= d {
                // SAFETY: c + 16 <= d, inside both rows.
                unsafe {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qr.add(c)), _mm256_loadu_ps(kf.as_ptr().add(c)), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qr.add(c + 8)), _mm256_loadu_ps(kf.as_ptr().add(c + 8)), a1);
                }
                c += 16;
            }
            if c < d {
                // SAFETY: d is a multiple of 8, so c + 8 == d here.
                unsafe { a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qr.add(c)), _mm256_loadu_ps(kf.as_ptr().add(c)), a0) };
            }
            out[r * n + j] = hsum(_mm256_add_ps(a0, a1)) * scale;
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn accumulate_avx2(p: &[f32], g: usize, v: &[u16], d: usize, acc: &mut [f32]) {
    let n = v.len() / d;
    let mut vf = [0f32; MAX_DIM];
    for j in 0..n {
        // SAFETY: row j lies inside `v` (n * d values, checked by the caller).
        unsafe { widen(v.as_ptr().add(j * d), d, &mut vf) };
        for r in 0..g {
            let w = _mm256_set1_ps(p[r * n + j]);
            let ar = acc[r * d..(r + 1) * d].as_mut_ptr();
            let mut c = 0;
            while c < d {
                // SAFETY: c + 8 <= d, inside row r of `acc` and inside `vf`.
                unsafe {
                    let x = _mm256_fmadd_ps(w, _mm256_loadu_ps(vf.as_ptr().add(c)), _mm256_loadu_ps(ar.add(c)));
                    _mm256_storeu_ps(ar.add(c), x);
                }
                c += 8;
            }
        }
    }
}

// ---- Prompt-chunk attention (`prefill.rs`) on AVX-512F: 16 rows a vector.

use super::prefill;

/// The prompt-chunk primitives, when this CPU has AVX-512F.
pub(super) fn prefill_avx512() -> Option<prefill::Prims> {
    is_x86_feature_detected!("avx512f").then_some(prefill::Prims {
        scores: p_scores,
        softmax: p_softmax,
        accumulate: p_accumulate,
    })
}

/// Whether the row-lane layouts hold what the loops index (`rp` a multiple
/// of 16, `kb` of 4, `d` of 4, every slice long enough).
fn fits(rp: usize, kb: usize, d: usize, lens: &[(usize, usize)]) -> bool {
    rp % 16 == 0 && kb % 4 == 0 && d % 4 == 0 && lens.iter().all(|&(have, need)| have >= need)
}

fn p_scores(qt: &[f32], rp: usize, kf: &[f32], kb: usize, d: usize, s: &mut [f32]) {
    if !fits(rp, kb, d, &[(qt.len(), d * rp), (kf.len(), kb * d), (s.len(), kb * rp)]) {
        return prefill::scores_scalar(qt, rp, kf, kb, d, s);
    }
    // SAFETY: only `prefill_avx512()` hands this fn out, after detecting
    // AVX-512F; `fits` checked the lengths the loops index by.
    unsafe { scores_avx512(qt.as_ptr(), rp, kf.as_ptr(), kb, d, s.as_mut_ptr()) }
}

fn p_softmax(s: &mut [f32], rp: usize, kb: usize, m: &mut [f32], l: &mut [f32], ot: &mut [f32], d: usize) {
    if !fits(rp, kb, d, &[(s.len(), kb * rp), (m.len(), rp), (l.len(), rp), (ot.len(), d * rp)]) {
        return prefill::softmax_scalar(s, rp, kb, m, l, ot, d);
    }
    // SAFETY: as in `p_scores`.
    unsafe { softmax_avx512(s.as_mut_ptr(), rp, kb, m.as_mut_ptr(), l.as_mut_ptr(), ot.as_mut_ptr(), d) }
}

fn p_accumulate(p: &[f32], rp: usize, vf: &[f32], kb: usize, d: usize, ot: &mut [f32]) {
    if !fits(rp, kb, d, &[(p.len(), kb * rp), (vf.len(), kb * d), (ot.len(), d * rp)]) {
        return prefill::accumulate_scalar(p, rp, vf, kb, d, ot);
    }
    // SAFETY: as in `p_scores`.
    unsafe { accumulate_avx512(p.as_ptr(), rp, vf.as_ptr(), kb, d, ot.as_mut_ptr()) }
}

/// Rows `r0..r0 + 16 NV` of `s` for keys `0..kb`, four keys at a time.
#[target_feature(enable = "avx512f")]
unsafe fn scores_tile<const NV: usize>(qt: *const f32, rp: usize, kf: *const f32, kb: usize, d: usize, s: *mut f32, r0: usize) {
    let mut j = 0;
    while j < kb {
        let mut acc = [[_mm512_setzero_ps(); NV]; 4];
        for c in 0..d {
            // SAFETY (all loads and stores): `c < d`, `j + 3 < kb`,
            // `r0 + 16 NV <= rp`, within the lengths `p_scores` checked.
            let row = unsafe { qt.add(c * rp + r0) };
            let mut qv = [_mm512_setzero_ps(); NV];
            for (v, x) in qv.iter_mut().enumerate() {
                *x = unsafe { _mm512_loadu_ps(row.add(16 * v)) };
            }
            for (k, a) in acc.iter_mut().enumerate() {
                let kv = _mm512_set1_ps(unsafe { *kf.add((j + k) * d + c) });
                for v in 0..NV {
                    a[v] = _mm512_fmadd_ps(kv, qv[v], a[v]);
                }
            }
        }
        for (k, a) in acc.iter().enumerate() {
            for (v, x) in a.iter().enumerate() {
                unsafe { _mm512_storeu_ps(s.add((j + k) * rp + r0 + 16 * v), *x) };
            }
        }
        j += 4;
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn scores_avx512(qt: *const f32, rp: usize, kf: *const f32, kb: usize, d: usize, s: *mut f32) {
    let mut r0 = 0;
    while r0 < rp {
        let nv = ((rp - r0) / 16).min(4);
        // SAFETY: `r0 + 16 nv <= rp`; the rest as the caller checked.
        unsafe {
            match nv {
                4 => scores_tile::<4>(qt, rp, kf, kb, d, s, r0),
                3 => scores_tile::<3>(qt, rp, kf, kb, d, s, r0),
                2 => scores_tile::<2>(qt, rp, kf, kb, d, s, r0),
                _ => scores_tile::<1>(qt, rp, kf, kb, d, s, r0),
            }
        }
        r0 += 16 * nv;
    }
}

/// `ot[c][rows]` for `c` in four at a time, rows `r0..r0 + 16 NV`, over keys `0..kb`.
#[target_feature(enable = "avx512f")]
unsafe fn accumulate_tile<const NV: usize>(p: *const f32, rp: usize, vf: *const f32, kb: usize, d: usize, ot: *mut f32, r0: usize) {
    let mut c = 0;
    while c < d {
        // SAFETY (all loads and stores): `c + 3 < d`, `j < kb`,
        // `r0 + 16 NV <= rp`, within the lengths `p_accumulate` checked.
        let mut acc = [[_mm512_setzero_ps(); NV]; 4];
        for (k, a) in acc.iter_mut().enumerate() {
            for (v, x) in a.iter_mut().enumerate() {
                *x = unsafe { _mm512_loadu_ps(ot.add((c + k) * rp + r0 + 16 * v)) };
            }
        }
        for j in 0..kb {
            let row = unsafe { p.add(j * rp + r0) };
            let mut pv = [_mm512_setzero_ps(); NV];
            for (v, x) in pv.iter_mut().enumerate() {
                *x = unsafe { _mm512_loadu_ps(row.add(16 * v)) };
            }
            for (k, a) in acc.iter_mut().enumerate() {
                let vv = _mm512_set1_ps(unsafe { *vf.add(j * d + c + k) });
                for v in 0..NV {
                    a[v] = _mm512_fmadd_ps(vv, pv[v], a[v]);
                }
            }
        }
        for (k, a) in acc.iter().enumerate() {
            for (v, x) in a.iter().enumerate() {
                unsafe { _mm512_storeu_ps(ot.add((c + k) * rp + r0 + 16 * v), *x) };
            }
        }
        c += 4;
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn accumulate_avx512(p: *const f32, rp: usize, vf: *const f32, kb: usize, d: usize, ot: *mut f32) {
    let mut r0 = 0;
    while r0 < rp {
        let nv = ((rp - r0) / 16).min(4);
        // SAFETY: `r0 + 16 nv <= rp`; the rest as the caller checked.
        unsafe {
            match nv {
                4 => accumulate_tile::<4>(p, rp, vf, kb, d, ot, r0),
                3 => accumulate_tile::<3>(p, rp, vf, kb, d, ot, r0),
                2 => accumulate_tile::<2>(p, rp, vf, kb, d, ot, r0),
                _ => accumulate_tile::<1>(p, rp, vf, kb, d, ot, r0),
            }
        }
        r0 += 16 * nv;
    }
}

/// `e^x` for `x <= 0`, 16 lanes: the same steps as `kernels::exp_nonpositive`.
#[target_feature(enable = "avx512f")]
fn exp16(x: __m512) -> __m512 {
    const ROUND: f32 = 12_582_912.0;
    let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
    let k = _mm512_fmadd_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E), _mm512_set1_ps(ROUND));
    let n = _mm512_sub_ps(k, _mm512_set1_ps(ROUND));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.0 / 5040.0);
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let e = _mm512_add_epi32(_mm512_sub_epi32(_mm512_castps_si512(k), _mm512_set1_epi32(ROUND.to_bits() as i32)), _mm512_set1_epi32(127));
    _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32::<23>(e)))
}

#[target_feature(enable = "avx512f")]
unsafe fn softmax_avx512(s: *mut f32, rp: usize, kb: usize, m: *mut f32, l: *mut f32, ot: *mut f32, d: usize) {
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut r0 = 0;
    while r0 < rp {
        // SAFETY (all loads and stores): `r0 + 16 <= rp`, `j < kb`, `c < d`,
        // within the lengths `p_softmax` checked.
        let m_old = unsafe { _mm512_loadu_ps(m.add(r0)) };
        let mut mx = m_old;
        for j in 0..kb {
            mx = _mm512_max_ps(mx, unsafe { _mm512_loadu_ps(s.add(j * rp + r0)) });
        }
        let corr = exp16(_mm512_sub_ps(m_old, mx));
        let mut sum = _mm512_setzero_ps();
        for j in 0..kb {
            let at = unsafe { s.add(j * rp + r0) };
            let x = unsafe { _mm512_loadu_ps(at) };
            let live = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(x, ninf);
            let e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(x, mx)));
            unsafe { _mm512_storeu_ps(at, e) };
            sum = _mm512_add_ps(sum, e);
        }
        let lv = unsafe { _mm512_loadu_ps(l.add(r0)) };
        unsafe { _mm512_storeu_ps(l.add(r0), _mm512_fmadd_ps(lv, corr, sum)) };
        unsafe { _mm512_storeu_ps(m.add(r0), mx) };
        for c in 0..d {
            let at = unsafe { ot.add(c * rp + r0) };
            unsafe { _mm512_storeu_ps(at, _mm512_mul_ps(_mm512_loadu_ps(at), corr)) };
        }
        r0 += 16;
    }
}

// ---- The same on AVX2 + FMA + F16C: 8 rows a vector, tiles of 16 rows.

/// The prompt-chunk primitives on AVX2, FMA and F16C (CPUs without AVX-512).
pub(super) fn prefill_avx2() -> Option<prefill::Prims> {
    (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")).then_some(prefill::Prims {
        scores: p2_scores,
        softmax: p2_softmax,
        accumulate: p2_accumulate,
    })
}

fn p2_scores(qt: &[f32], rp: usize, kf: &[f32], kb: usize, d: usize, s: &mut [f32]) {
    if !fits(rp, kb, d, &[(qt.len(), d * rp), (kf.len(), kb * d), (s.len(), kb * rp)]) {
        return prefill::scores_scalar(qt, rp, kf, kb, d, s);
    }
    // SAFETY: only `prefill_avx2()` hands this fn out, after detecting AVX2,
    // FMA and F16C; `fits` checked the lengths the loops index by.
    unsafe { scores_avx2_16(qt.as_ptr(), rp, kf.as_ptr(), kb, d, s.as_mut_ptr()) }
}

fn p2_softmax(s: &mut [f32], rp: usize, kb: usize, m: &mut [f32], l: &mut [f32], ot: &mut [f32], d: usize) {
    if !fits(rp, kb, d, &[(s.len(), kb * rp), (m.len(), rp), (l.len(), rp), (ot.len(), d * rp)]) {
        return prefill::softmax_scalar(s, rp, kb, m, l, ot, d);
    }
    // SAFETY: as in `p2_scores`.
    unsafe { softmax_avx2(s.as_mut_ptr(), rp, kb, m.as_mut_ptr(), l.as_mut_ptr(), ot.as_mut_ptr(), d) }
}

fn p2_accumulate(p: &[f32], rp: usize, vf: &[f32], kb: usize, d: usize, ot: &mut [f32]) {
    if !fits(rp, kb, d, &[(p.len(), kb * rp), (vf.len(), kb * d), (ot.len(), d * rp)]) {
        return prefill::accumulate_scalar(p, rp, vf, kb, d, ot);
    }
    // SAFETY: as in `p2_scores`.
    unsafe { accumulate_avx2_16(p.as_ptr(), rp, vf.as_ptr(), kb, d, ot.as_mut_ptr()) }
}

/// Scores for rows in tiles of 16 (two vectors) by four keys.
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_avx2_16(qt: *const f32, rp: usize, kf: *const f32, kb: usize, d: usize, s: *mut f32) {
    let mut r0 = 0;
    while r0 < rp {
        let mut j = 0;
        while j < kb {
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            for c in 0..d {
                // SAFETY (all loads and stores): `c < d`, `j + 3 < kb`,
                // `r0 + 16 <= rp`, within the lengths `p2_scores` checked.
                let row = unsafe { qt.add(c * rp + r0) };
                let q0 = unsafe { _mm256_loadu_ps(row) };
                let q1 = unsafe { _mm256_loadu_ps(row.add(8)) };
                for (k, a) in acc.iter_mut().enumerate() {
                    let kv = _mm256_set1_ps(unsafe { *kf.add((j + k) * d + c) });
                    a[0] = _mm256_fmadd_ps(kv, q0, a[0]);
                    a[1] = _mm256_fmadd_ps(kv, q1, a[1]);
                }
            }
            for (k, a) in acc.iter().enumerate() {
                unsafe { _mm256_storeu_ps(s.add((j + k) * rp + r0), a[0]) };
                unsafe { _mm256_storeu_ps(s.add((j + k) * rp + r0 + 8), a[1]) };
            }
            j += 4;
        }
        r0 += 16;
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn accumulate_avx2_16(p: *const f32, rp: usize, vf: *const f32, kb: usize, d: usize, ot: *mut f32) {
    let mut r0 = 0;
    while r0 < rp {
        let mut c = 0;
        while c < d {
            // SAFETY (all loads and stores): `c + 3 < d`, `j < kb`,
            // `r0 + 16 <= rp`, within the lengths `p2_accumulate` checked.
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            for (k, a) in acc.iter_mut().enumerate() {
                a[0] = unsafe { _mm256_loadu_ps(ot.add((c + k) * rp + r0)) };
                a[1] = unsafe { _mm256_loadu_ps(ot.add((c + k) * rp + r0 + 8)) };
            }
            for j in 0..kb {
                let row = unsafe { p.add(j * rp + r0) };
                let p0 = unsafe { _mm256_loadu_ps(row) };
                let p1 = unsafe { _mm256_loadu_ps(row.add(8)) };
                for (k, a) in acc.iter_mut().enumerate() {
                    let vv = _mm256_set1_ps(unsafe { *vf.add(j * d + c + k) });
                    a[0] = _mm256_fmadd_ps(vv, p0, a[0]);
                    a[1] = _mm256_fmadd_ps(vv, p1, a[1]);
                }
            }
            for (k, a) in acc.iter().enumerate() {
                unsafe { _mm256_storeu_ps(ot.add((c + k) * rp + r0), a[0]) };
                unsafe { _mm256_storeu_ps(ot.add((c + k) * rp + r0 + 8), a[1]) };
            }
            c += 4;
        }
        r0 += 16;
    }
}

/// `e^x` for `x <= 0`, 8 lanes: the same steps as `exp16`.
#[target_feature(enable = "avx2,fma")]
fn exp8(x: __m256) -> __m256 {
    const ROUND: f32 = 12_582_912.0;
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
    let k = _mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), _mm256_set1_ps(ROUND));
    let n = _mm256_sub_ps(k, _mm256_set1_ps(ROUND));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.0 / 5040.0);
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let e = _mm256_add_epi32(_mm256_sub_epi32(_mm256_castps_si256(k), _mm256_set1_epi32(ROUND.to_bits() as i32)), _mm256_set1_epi32(127));
    _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e)))
}

#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(s: *mut f32, rp: usize, kb: usize, m: *mut f32, l: *mut f32, ot: *mut f32, d: usize) {
    let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut r0 = 0;
    while r0 < rp {
        // SAFETY (all loads and stores): `r0 + 8 <= rp`, `j < kb`, `c < d`,
        // within the lengths `p2_softmax` checked.
        let m_old = unsafe { _mm256_loadu_ps(m.add(r0)) };
        let mut mx = m_old;
        for j in 0..kb {
            mx = _mm256_max_ps(mx, unsafe { _mm256_loadu_ps(s.add(j * rp + r0)) });
        }
        let corr = exp8(_mm256_sub_ps(m_old, mx));
        let mut sum = _mm256_setzero_ps();
        for j in 0..kb {
            let at = unsafe { s.add(j * rp + r0) };
            let x = unsafe { _mm256_loadu_ps(at) };
            let live = _mm256_cmp_ps::<_CMP_NEQ_OQ>(x, ninf);
            let e = _mm256_and_ps(live, exp8(_mm256_sub_ps(x, mx)));
            unsafe { _mm256_storeu_ps(at, e) };
            sum = _mm256_add_ps(sum, e);
        }
        let lv = unsafe { _mm256_loadu_ps(l.add(r0)) };
        unsafe { _mm256_storeu_ps(l.add(r0), _mm256_fmadd_ps(lv, corr, sum)) };
        unsafe { _mm256_storeu_ps(m.add(r0), mx) };
        for c in 0..d {
            let at = unsafe { ot.add(c * rp + r0) };
            unsafe { _mm256_storeu_ps(at, _mm256_mul_ps(_mm256_loadu_ps(at), corr)) };
        }
        r0 += 8;
    }
}
