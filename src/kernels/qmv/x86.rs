//! x86-64 kernels: AVX-512F and AVX2 (+FMA, F16C).
//!
//! Both dequantize a block of columns to f32 (`q * scale + bias`) once and
//! multiply-add it into every activation row, with two accumulators per row
//! to hide FMA latency. For 4-bit values, x comes permuted in blocks (see
//! `Impl::perm_block`) so that unpacking is a widen plus shift, no shuffle.

use std::arch::x86_64::*;

use super::{check, f16_to_f32, row_f32, Impl, Isa, Job, Scales};

/// The AVX-512 kernels, when this CPU has AVX-512F.
pub(super) fn avx512() -> Option<Impl> {
    is_x86_feature_detected!("avx512f").then_some(Impl {
        isa: Isa::Avx512,
        perm_block: 32,
        rows4: rows4_avx512,
        rows8: rows8_avx512,
    })
}

/// The AVX2 kernels, when this CPU has AVX2, FMA and F16C.
pub(super) fn avx2() -> Option<Impl> {
    (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c"))
        .then_some(Impl { isa: Isa::Avx2, perm_block: 16, rows4: rows4_avx2, rows8: rows8_avx2 })
}

fn rows4_avx512(job: &Job, r0: usize, out: &mut [&mut [f32]]) {
    check(job, r0, out);
    // SAFETY: only `avx512()` hands this fn out, after detecting AVX-512F;
    // `validate` and `check` established the lengths the kernel relies on.
    unsafe { by_m!(kernel_avx512, 4, job, r0, out) }
}

fn rows8_avx512(job: &Job, r0: usize, out: &mut [&mut [f32]]) {
    check(job, r0, out);
    // SAFETY: as in `rows4_avx512`.
    unsafe { by_m!(kernel_avx512, 8, job, r0, out) }
}

fn rows4_avx2(job: &Job, r0: usize, out: &mut [&mut [f32]]) {
    check(job, r0, out);
    // SAFETY: only `avx2()` hands this fn out, after detecting AVX2, FMA and
    // F16C; `validate` and `check` established the lengths the kernel relies on.
    unsafe { by_m!(kernel_avx2, 4, job, r0, out) }
}

fn rows8_avx2(job: &Job, r0: usize, out: &mut [&mut [f32]]) {
    check(job, r0, out);
    // SAFETY: as in `rows4_avx2`.
    unsafe { by_m!(kernel_avx2, 8, job, r0, out) }
}

/// Row `r`'s scales (or biases) as f32, F16 widened 16 at a time.
#[target_feature(enable = "avx512f")]
fn widen_avx512<'b>(sc: &Scales<'b>, r: usize, n: usize, buf: &'b mut [f32]) -> &'b [f32] {
    let Scales::F16(all) = *sc else { return row_f32(sc, r, n, buf) };
    let (src, dst) = (&all[r * n..(r + 1) * n], &mut buf[..n]);
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n = src.len() = dst.len(); unaligned loads and stores.
        unsafe {
            let h = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
            _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
        }
        i += 16;
    }
    for k in i..n {
        dst[k] = f16_to_f32(src[k]);
    }
    dst
}

/// Row `r`'s scales (or biases) as f32, F16 widened 8 at a time.
#[target_feature(enable = "avx2,f16c")]
fn widen_avx2<'b>(sc: &Scales<'b>, r: usize, n: usize, buf: &'b mut [f32]) -> &'b [f32] {
    let Scales::F16(all) = *sc else { return row_f32(sc, r, n, buf) };
    let (src, dst) = (&all[r * n..(r + 1) * n], &mut buf[..n]);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n = src.len() = dst.len(); unaligned loads and stores.
        unsafe {
            let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    for k in i..n {
        dst[k] = f16_to_f32(src[k]);
    }
    dst
}

/// The 32 dequantized weights of columns `c .. c + 32` of a row, in x's
/// order, as two 16-lane vectors. 4-bit: 16 bytes widen to 16 lanes (lane k
/// = byte k); a lane's low nibble (column 2k) and high nibble (column 2k+1)
/// index `lut`, the group's 16 dequantized values (`vpermps` reads only the
/// low 4 bits), so no mask and no int-to-float conversion. 8-bit: two
/// 16-byte widens, converted, scaled and offset.
///
/// # Safety
/// AVX-512F; `row + c * BITS / 8 .. + 32 * BITS / 8` readable.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn block_avx512<const BITS: usize>(
    row: *const u8,
    c: usize,
    lut: __m512,
    sv: __m512,
    bv: __m512,
) -> (__m512, __m512) {
    if BITS == 4 {
        let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(row.add(c / 2) as *const __m128i));
        (_mm512_permutexvar_ps(v, lut), _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), lut))
    } else {
        let q0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(row.add(c) as *const __m128i));
        let q1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(row.add(c + 16) as *const __m128i));
        (_mm512_fmadd_ps(_mm512_cvtepi32_ps(q0), sv, bv), _mm512_fmadd_ps(_mm512_cvtepi32_ps(q1), sv, bv))
    }
}

/// Columns in pairs of 32-column blocks (a pair may span two groups when
/// g = 32). Four accumulators per activation row, so the FMA chains
/// (4-cycle latency) do not limit the one-row case; the same four for
/// every M (`by_m!` runs more than four rows as two calls), so each row's
/// sums are the same bits whatever rows share the call (a sequence decoded
/// in a batch gets exactly what it gets alone).
///
/// # Safety
/// AVX-512F must be available, and `check(job, r0, out)` must hold with `job.m == M`.
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)] // j indexes several accumulator arrays and x's rows
unsafe fn kernel_avx512<const BITS: usize, const M: usize>(job: &Job, r0: usize, out: &mut [&mut [f32]]) {
    let w = job.w;
    let (cols, g) = (w.cols, w.group_size);
    let groups = cols / g;
    let blocks = cols / 32;
    // Block b (columns 32b ..) lies in group b >> shift.
    let shift = (g / 32).trailing_zeros();
    let row_bytes = cols * BITS / 8;
    // Little-endian words: byte `c * BITS / 8` of a row holds column c (low nibble first).
    let packed = w.packed.as_ptr() as *const u8;
    let x = job.x.as_ptr();
    let (mut sbuf, mut bbuf) = (vec![0.0f32; groups], vec![0.0f32; groups]);
    let iota = _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.);
    for i in 0..out[0].len() {
        let r = r0 + i;
        let s = widen_avx512(&w.scales, r, groups, &mut sbuf);
        let b = widen_avx512(&w.biases, r, groups, &mut bbuf);
        // The dequantization constants of block k: (table, scale, bias).
        let consts = |k: usize| {
            let (sv, bv) = (_mm512_set1_ps(s[k >> shift]), _mm512_set1_ps(b[k >> shift]));
            (if BITS == 4 { _mm512_fmadd_ps(iota, sv, bv) } else { sv }, sv, bv)
        };
        // SAFETY (all pointer arithmetic below): r < rows, so the row's
        // row_bytes lie inside `packed`; block k < blocks covers columns
        // 32k .. 32k + 32 <= cols, which bounds every read of the row and of
        // x's row j < M (x is [M, cols]).
        let row = packed.add(r * row_bytes);
        let mut acc = [[_mm512_setzero_ps(); M]; 4];
        let mut k = 0;
        while k + 2 <= blocks {
            let (lut0, sv0, bv0) = consts(k);
            // With g >= 64 both blocks share a group.
            let (lut1, sv1, bv1) = if g == 32 { consts(k + 1) } else { (lut0, sv0, bv0) };
            let (w0, w1) = block_avx512::<BITS>(row, 32 * k, lut0, sv0, bv0);
            let (w2, w3) = block_avx512::<BITS>(row, 32 * k + 32, lut1, sv1, bv1);
            for j in 0..M {
                let xj = x.add(j * cols + 32 * k);
                acc[0][j] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xj), acc[0][j]);
                acc[1][j] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xj.add(16)), acc[1][j]);
                acc[2][j] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xj.add(32)), acc[2][j]);
                acc[3][j] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xj.add(48)), acc[3][j]);
            }
            k += 2;
        }
        if k < blocks {
            let (lut0, sv0, bv0) = consts(k);
            let (w0, w1) = block_avx512::<BITS>(row, 32 * k, lut0, sv0, bv0);
            for j in 0..M {
                let xj = x.add(j * cols + 32 * k);
                acc[0][j] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xj), acc[0][j]);
                acc[1][j] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xj.add(16)), acc[1][j]);
            }
        }
        for j in 0..M {
            let sum = _mm512_add_ps(_mm512_add_ps(acc[0][j], acc[1][j]), _mm512_add_ps(acc[2][j], acc[3][j]));
            out[j][i] = _mm512_reduce_add_ps(sum);
        }
    }
}

/// Horizontal sum of 8 lanes.
#[target_feature(enable = "avx2")]
fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// The 16 dequantized weights of columns `c .. c + 16` of a row, in x's
/// order, as two 8-lane vectors. 4-bit: 8 bytes widen to 8 lanes; masked
/// low nibbles are columns 0, 2, .. 14, shifted high nibbles 1, 3, .. 15.
/// 8-bit: two 8-byte widens.
///
/// # Safety
/// AVX2 and FMA; `row + c * BITS / 8 .. + 16 * BITS / 8` readable.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2<const BITS: usize>(row: *const u8, c: usize, sv: __m256, bv: __m256) -> (__m256, __m256) {
    let (q0, q1) = if BITS == 4 {
        let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(row.add(c / 2) as *const __m128i));
        (_mm256_and_si256(v, _mm256_set1_epi32(0xf)), _mm256_srli_epi32::<4>(v))
    } else {
        (
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(row.add(c) as *const __m128i)),
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(row.add(c + 8) as *const __m128i)),
        )
    };
    (_mm256_fmadd_ps(_mm256_cvtepi32_ps(q0), sv, bv), _mm256_fmadd_ps(_mm256_cvtepi32_ps(q1), sv, bv))
}

/// Units of 32 columns (one group), four 8-lane weight vectors each. Four
/// accumulators per activation row up to M = 2, two up to M = 4, one above
/// (so that they fit the 16 ymm registers).
///
/// # Safety
/// AVX2, FMA and F16C must be available, and `check(job, r0, out)` must hold with `job.m == M`.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // j indexes several accumulator arrays and x's rows
unsafe fn kernel_avx2<const BITS: usize, const M: usize>(job: &Job, r0: usize, out: &mut [&mut [f32]]) {
    let w = job.w;
    let (cols, g) = (w.cols, w.group_size);
    let groups = cols / g;
    let shift = (g / 32).trailing_zeros();
    let row_bytes = cols * BITS / 8;
    let packed = w.packed.as_ptr() as *const u8;
    let x = job.x.as_ptr();
    let (mut sbuf, mut bbuf) = (vec![0.0f32; groups], vec![0.0f32; groups]);
    // Four accumulators per row for every M, as in `kernel_avx512` (rows
    // identical whatever shares the call; past M = 3 some live in memory:
    // AVX2 has 16 registers).
    let (a1, a2, a3) = (1, 2, 3);
    for i in 0..out[0].len() {
        let r = r0 + i;
        let s = widen_avx2(&w.scales, r, groups, &mut sbuf);
        let b = widen_avx2(&w.biases, r, groups, &mut bbuf);
        // SAFETY (all pointer arithmetic below): as in `kernel_avx512`, with
        // unit k < cols / 32 covering columns 32k .. 32k + 32 <= cols.
        let row = packed.add(r * row_bytes);
        let mut acc = [[_mm256_setzero_ps(); M]; 4];
        for k in 0..cols / 32 {
            let (sv, bv) = (_mm256_set1_ps(s[k >> shift]), _mm256_set1_ps(b[k >> shift]));
            let (w0, w1) = block_avx2::<BITS>(row, 32 * k, sv, bv);
            let (w2, w3) = block_avx2::<BITS>(row, 32 * k + 16, sv, bv);
            for j in 0..M {
                let xj = x.add(j * cols + 32 * k);
                acc[0][j] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xj), acc[0][j]);
                acc[a1][j] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xj.add(8)), acc[a1][j]);
                acc[a2][j] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xj.add(16)), acc[a2][j]);
                acc[a3][j] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xj.add(24)), acc[a3][j]);
            }
        }
        for j in 0..M {
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0][j], acc[1][j]), _mm256_add_ps(acc[2][j], acc[3][j]));
            out[j][i] = hsum256(sum);
        }
    }
}

/// Rows `r0 .. r0 + out.len() / cols` of the dense matrix (`q * scale +
/// bias`, one FMA as the products' kernels compute it), in natural order:
/// each packed word is broadcast and shifted lane by lane to its values.
/// `None` when this CPU lacks AVX2, FMA and F16C.
pub(super) fn dequant_rows_avx2(w: &super::QuantMatrix, r0: usize, out: &mut [f32]) -> Option<()> {
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")) {
        return None;
    }
    let (cols, g, bits) = (w.cols, w.group_size, w.bits as usize);
    assert!(matches!(bits, 4 | 8) && cols % g == 0 && g % 32 == 0 && out.len() % cols == 0);
    let rows = out.len() / cols;
    assert!(r0 + rows <= w.rows && w.packed.len() == w.rows * cols * bits / 32);
    assert!(w.scales.len() == w.rows * (cols / g) && w.biases.len() == w.rows * (cols / g));
    // SAFETY: AVX2, FMA and F16C were detected above; the asserts bound
    // every read of `packed` (row r < rows holds cols * bits / 32 words)
    // and every write of `out` (rows * cols values).
    unsafe { dequant_avx2(w, r0, rows, out) };
    Some(())
}

/// # Safety
/// AVX2, FMA and F16C; the shapes `dequant_rows_avx2` asserts.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequant_avx2(w: &super::QuantMatrix, r0: usize, rows: usize, out: &mut [f32]) {
    let (cols, g, bits) = (w.cols, w.group_size, w.bits as usize);
    let groups = cols / g;
    let words = cols * bits / 32;
    let (mut sbuf, mut bbuf) = (vec![0.0f32; groups], vec![0.0f32; groups]);
    let (shifts, mask) = if bits == 4 {
        (_mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), _mm256_set1_epi32(0xF))
    } else {
        (_mm256_setr_epi32(0, 8, 16, 24, 0, 8, 16, 24), _mm256_set1_epi32(0xFF))
    };
    for i in 0..rows {
        let r = r0 + i;
        let s = widen_avx2(&w.scales, r, groups, &mut sbuf);
        let b = widen_avx2(&w.biases, r, groups, &mut bbuf);
        let packed = w.packed.as_ptr().add(r * words);
        let dst = out.as_mut_ptr().add(i * cols);
        // 8 values per step: one word of 4-bit values, two of 8-bit.
        let mut c = 0;
        while c < cols {
            let (sv, bv) = (_mm256_set1_ps(s[c / g]), _mm256_set1_ps(b[c / g]));
            let v = if bits == 4 {
                _mm256_set1_epi32(*packed.add(c / 8) as i32)
            } else {
                let (lo, hi) = (*packed.add(c / 4) as i32, *packed.add(c / 4 + 1) as i32);
                _mm256_setr_epi32(lo, lo, lo, lo, hi, hi, hi, hi)
            };
            let q = _mm256_and_si256(_mm256_srlv_epi32(v, shifts), mask);
            _mm256_storeu_ps(dst.add(c), _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), sv, bv));
            c += 8;
        }
    }
}

/// `dst[i] = src[i]` widened from f16 bits, 8 at a time; `None` without
/// AVX2 and F16C.
pub(super) fn widen_f16_avx2(src: &[u16], dst: &mut [f32]) -> Option<()> {
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")) {
        return None;
    }
    assert_eq!(src.len(), dst.len());
    // SAFETY: AVX2 and F16C detected above; `widen_all` reads and writes
    // within the equal lengths just checked.
    unsafe { widen_all(src, dst) };
    Some(())
}

/// # Safety
/// AVX2 and F16C; `src.len() == dst.len()`.
#[target_feature(enable = "avx2,f16c")]
unsafe fn widen_all(src: &[u16], dst: &mut [f32]) {
    let n = src.len();
    let mut i = 0;
    while i + 8 <= n {
        let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        i += 8;
    }
    for k in i..n {
        dst[k] = f16_to_f32(src[k]);
    }
}
