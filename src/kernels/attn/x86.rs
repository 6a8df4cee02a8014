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
