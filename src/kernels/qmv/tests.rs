//! Scalar vs a dense f64 reference, every SIMD path vs scalar, and both vs
//! MLX's own `dequantize` / `quantized_matmul`.

use super::*;

/// SplitMix64: deterministic test data without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// An owned random quantized matrix with f32 scales and biases.
struct Owned {
    packed: Vec<u32>,
    scales: Vec<f32>,
    biases: Vec<f32>,
    rows: usize,
    cols: usize,
    group_size: usize,
    bits: u32,
}

impl Owned {
    fn random(rng: &mut Rng, rows: usize, cols: usize, group_size: usize, bits: u32) -> Self {
        let groups = rows * cols / group_size;
        Owned {
            packed: (0..rows * cols * bits as usize / 32).map(|_| rng.next() as u32).collect(),
            scales: (0..groups).map(|_| 0.05 * rng.f32()).collect(),
            biases: (0..groups).map(|_| 0.5 * rng.f32()).collect(),
            rows,
            cols,
            group_size,
            bits,
        }
    }
    fn view(&self) -> QuantMatrix<'_> {
        QuantMatrix {
            packed: &self.packed,
            scales: Scales::F32(&self.scales),
            biases: Scales::F32(&self.biases),
            rows: self.rows,
            cols: self.cols,
            group_size: self.group_size,
            bits: self.bits,
        }
    }
}

/// W dequantized by hand in f64, reading the packed words as little-endian
/// bytes (a different route from `scalar::q_at`'s word shifts).
fn dense_f64(w: &QuantMatrix) -> Vec<f64> {
    let bytes: Vec<u8> = w.packed.iter().flat_map(|v| v.to_le_bytes()).collect();
    let row_bytes = w.cols * w.bits as usize / 8;
    let groups = w.cols / w.group_size;
    let mut out = Vec::with_capacity(w.rows * w.cols);
    for r in 0..w.rows {
        for c in 0..w.cols {
            let q = match w.bits {
                8 => bytes[r * row_bytes + c],
                4 => (bytes[r * row_bytes + c / 2] >> (4 * (c % 2))) & 0xf,
                _ => unreachable!(),
            } as f64;
            let gi = r * groups + c / w.group_size;
            out.push(w.scales.get(gi) as f64 * q + w.biases.get(gi) as f64);
        }
    }
    out
}

/// `(y, sum_c |x w|)` per output, in f64.
fn reference(dense: &[f64], rows: usize, cols: usize, x: &[f32], m: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut y, mut mag) = (vec![0.0; m * rows], vec![0.0; m * rows]);
    for j in 0..m {
        for r in 0..rows {
            for c in 0..cols {
                let p = x[j * cols + c] as f64 * dense[r * cols + c];
                y[j * rows + r] += p;
                mag[j * rows + r] += p.abs();
            }
        }
    }
    (y, mag)
}

const COLS: [usize; 6] = [32, 64, 96, 128, 576, 1536];
const ROWS: [usize; 5] = [1, 3, 7, 64, 577];

fn shapes() -> impl Iterator<Item = (u32, usize, usize, usize)> {
    [4u32, 8].into_iter().flat_map(|bits| {
        [32usize, 64, 128].into_iter().flat_map(move |g| {
            COLS.into_iter()
                .filter(move |c| c % g == 0)
                .flat_map(move |cols| ROWS.into_iter().map(move |rows| (bits, g, rows, cols)))
        })
    })
}

/// Batch sizes per shape: all of 1..=8 where cheap, a spread on the big ones.
fn batches(rows: usize, cols: usize) -> Vec<usize> {
    if rows * cols > 100_000 {
        vec![1, 2, 5, 8]
    } else {
        (1..=MAX_M).collect()
    }
}

#[test]
fn scalar_matches_dense_f64_reference() {
    let mut rng = Rng(1);
    let mut checked = 0;
    for (bits, g, rows, cols) in shapes() {
        // The 1536-column, 577-row shapes cost the most; one group size is enough there.
        if rows * cols > 500_000 && g != 64 {
            continue;
        }
        let owned = Owned::random(&mut rng, rows, cols, g, bits);
        let w = owned.view();
        let dense = dense_f64(&w);
        for m in batches(rows, cols) {
            let x: Vec<f32> = (0..m * cols).map(|_| rng.f32()).collect();
            let mut y = vec![f32::NAN; m * rows];
            qmv_scalar(&w, &x, m, &mut y).unwrap();
            let (want, mag) = reference(&dense, rows, cols, &x, m);
            for i in 0..y.len() {
                let tol = 2e-6 * (cols as f64).sqrt() * mag[i] + 1e-30;
                assert!(
                    (y[i] as f64 - want[i]).abs() <= tol,
                    "{bits}-bit g{g} {rows}x{cols} m={m} [{i}]: {} vs {} (tol {tol})",
                    y[i],
                    want[i]
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 100, "{checked} cases");
}

/// Every available fast path, dispatched and explicit, single- and
/// multi-threaded, vs scalar. Errors are measured against `sum_c |x w|`, the
/// scale of f32 rounding (outputs themselves can be near 0 by cancellation).
#[test]
fn simd_paths_match_scalar() {
    let isas = available_isas();
    assert_eq!(isas.last(), Some(&Isa::Scalar));
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        assert!(isas.contains(&Isa::Avx512), "{isas:?}");
    }
    let mut rng = Rng(2);
    let mut worst = 0.0f64;
    for (bits, g, rows, cols) in shapes() {
        let owned = Owned::random(&mut rng, rows, cols, g, bits);
        let w = owned.view();
        let dense = dense_f64(&w);
        for m in batches(rows, cols) {
            let x: Vec<f32> = (0..m * cols).map(|_| rng.f32()).collect();
            let (_, mag) = reference(&dense, rows, cols, &x, m);
            let mut want = vec![0.0; m * rows];
            qmv_scalar(&w, &x, m, &mut want).unwrap();
            let mut runs: Vec<(Isa, usize)> = isas.iter().map(|&i| (i, 1)).collect();
            // 3: scoped threads; the pool's part count: the pool; 0: as `qmv` chooses.
            runs.extend([
                (selected_isa(), 3),
                (selected_isa(), super::Pool::global(MAX_THREADS).threads()),
                (selected_isa(), 0),
            ]);
            for (isa, threads) in runs {
                let mut y = vec![f32::NAN; m * rows];
                qmv_with(isa, threads, &w, &x, m, &mut y).unwrap();
                let (mut err, mut norm) = (0.0f64, 0.0f64);
                for i in 0..y.len() {
                    let d = (y[i] as f64 - want[i] as f64).abs();
                    assert!(
                        d <= 1e-6 * mag[i],
                        "{isa:?} x{threads} {bits}-bit g{g} {rows}x{cols} m={m} [{i}]: {} vs {} (magnitude {})",
                        y[i],
                        want[i],
                        mag[i]
                    );
                    err += d * d;
                    norm += mag[i] * mag[i];
                }
                worst = worst.max(err / norm);
            }
            let mut y = vec![f32::NAN; m * rows];
            qmv(&w, &x, m, &mut y).unwrap();
            assert!(
                y.iter().zip(&want).zip(&mag).all(|((a, b), m)| ((a - b).abs() as f64) <= 1e-6 * m),
                "dispatched {bits}-bit g{g} {rows}x{cols} m={m}"
            );
        }
    }
    assert!(worst < 1e-12, "normalized squared error {worst:e}");
}

/// The whole-matrix dequantization (for BLAS prefill) gives the reference's
/// values on every shape (FMA against a separate multiply and add: within
/// one rounding), and refuses a wrong output length.
#[test]
fn dequantize_matches_the_reference() {
    let mut rng = Rng(11);
    for (bits, g, rows, cols) in shapes() {
        let owned = Owned::random(&mut rng, rows, cols, g, bits);
        let w = owned.view();
        let mut want = vec![0f32; rows * cols];
        super::scalar::dequant_rows(&w, 0, &mut want);
        let mut got = vec![f32::NAN; rows * cols];
        super::dequantize(&w, &mut got).unwrap();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            // Values are below 2 in size: one rounding of the terms is under 1e-6.
            assert!((a - b).abs() <= 1e-6, "{bits}-bit g{g} {rows}x{cols} [{i}]: {a} vs {b}");
        }
        let dense = dense_f64(&w);
        assert!(want.iter().zip(&dense).all(|(a, b)| (*a as f64 - b).abs() <= 1e-6), "{bits}-bit g{g} {rows}x{cols}: reference");
        assert!(super::dequantize(&w, &mut got[1..]).is_err());
    }
}

/// Widening f16 bits to f32 (the prefill attention's read of the cache):
/// exact on every value, over a length that is not a multiple of the
/// pieces or the vectors.
#[test]
fn widen_f16_is_exact() {
    let src: Vec<u16> = (0..200_003u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 16) as u16).collect();
    let mut got = vec![0f32; src.len()];
    super::widen_f16(&src, &mut got).unwrap();
    for (h, g) in src.iter().zip(&got) {
        let want = half::f16::from_bits(*h).to_f32();
        assert!(want.to_bits() == g.to_bits() || (want.is_nan() && g.is_nan()), "{h:#06x}: {g} vs {want}");
    }
    assert!(super::widen_f16(&src, &mut got[1..]).is_err());
}

/// Each activation row's products are bit for bit the same whatever rows
/// share the call: a sequence decoded beside others in one batch (the
/// scheduler's batched step) gets exactly what it gets alone.
#[test]
fn each_row_is_the_same_alone_or_beside_others() {
    let mut rng = Rng(7);
    for (bits, g, rows, cols) in shapes() {
        let owned = Owned::random(&mut rng, rows, cols, g, bits);
        let w = owned.view();
        let x: Vec<f32> = (0..MAX_M * cols).map(|_| rng.f32()).collect();
        let alone: Vec<Vec<f32>> = x
            .chunks_exact(cols)
            .map(|row| {
                let mut y = vec![f32::NAN; rows];
                qmv(&w, row, 1, &mut y).unwrap();
                y
            })
            .collect();
        for m in 2..=MAX_M {
            let mut y = vec![f32::NAN; m * rows];
            qmv(&w, &x[..m * cols], m, &mut y).unwrap();
            for (j, (got, want)) in y.chunks_exact(rows).zip(&alone).enumerate() {
                let same = got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{bits}-bit g{g} {rows}x{cols}: row {j} of {m} differs from the row alone");
            }
        }
    }
}

/// 16-bit scales and biases: widened exactly, so the same values stored as
/// f32 give the same products on every path.
#[test]
fn f16_and_bf16_scales_match_f32() {
    let mut rng = Rng(3);
    for (bits, g, rows, cols) in [(4, 32, 37, 576), (8, 64, 19, 1536), (4, 128, 64, 384), (8, 32, 5, 32)] {
        let mut owned = Owned::random(&mut rng, rows, cols, g, bits);
        // Half-precision bit patterns, including subnormals and negatives.
        let s16: Vec<u16> = owned
            .scales
            .iter()
            .enumerate()
            .map(|(i, _)| if i % 7 == 0 { (rng.next() as u16) & 0x83ff } else { (rng.next() as u16) & 0xa7ff })
            .collect();
        let b16: Vec<u16> = owned.biases.iter().map(|_| 0x3000 ^ ((rng.next() as u16) & 0x8fff)).collect();
        for (kind, conv) in [("f16", f16_to_f32 as fn(u16) -> f32), ("bf16", bf16_to_f32)] {
            owned.scales = s16.iter().map(|&h| conv(h)).collect();
            owned.biases = b16.iter().map(|&h| conv(h)).collect();
            assert!(owned.scales.iter().chain(&owned.biases).all(|v| v.is_finite()));
            let w32 = owned.view();
            let (sc, bi) = if kind == "f16" {
                (Scales::F16(&s16), Scales::F16(&b16))
            } else {
                (Scales::Bf16(&s16), Scales::Bf16(&b16))
            };
            let w16 = QuantMatrix { scales: sc, biases: bi, ..w32 };
            for m in [1, 3, 8] {
                let x: Vec<f32> = (0..m * cols).map(|_| rng.f32()).collect();
                for isa in available_isas() {
                    let (mut a, mut b) = (vec![0.0; m * rows], vec![1.0; m * rows]);
                    qmv_with(isa, 1, &w32, &x, m, &mut a).unwrap();
                    qmv_with(isa, 1, &w16, &x, m, &mut b).unwrap();
                    assert_eq!(a, b, "{kind} {isa:?} {bits}-bit g{g} {rows}x{cols} m={m}");
                }
            }
        }
    }
}

#[test]
fn half_conversions() {
    for (h, f) in [
        (0x0000u16, 0.0f32),
        (0x8000, -0.0),
        (0x3c00, 1.0),
        (0xc000, -2.0),
        (0x7bff, 65504.0),
        (0x0001, 2f32.powi(-24)),
        (0x03ff, 1023.0 * 2f32.powi(-24)),
        (0x0400, 2f32.powi(-14)),
        (0x3555, 0.333_251_95),
        (0x7c00, f32::INFINITY),
        (0xfc00, f32::NEG_INFINITY),
    ] {
        assert_eq!(f16_to_f32(h).to_bits(), f.to_bits(), "{h:#06x}");
    }
    assert!(f16_to_f32(0x7e00).is_nan());
    assert_eq!(bf16_to_f32(0x3f80), 1.0);
    assert_eq!(bf16_to_f32(0xc0a0), -5.0);
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let owned = Owned::random(&mut Rng(4), 4, 64, 32, 4);
    let w = owned.view();
    let x = vec![0.0; 64 * 2];
    let mut y = vec![0.0; 4 * 2];
    assert_eq!(qmv(&w, &x, 2, &mut y), Ok(()));
    assert_eq!(qmv(&w, &x, 0, &mut y[..0]), Err(KernelError::Batch(0)));
    assert_eq!(qmv(&w, &[0.0; 64 * 9], 9, &mut [0.0; 36]), Err(KernelError::Batch(9)));
    assert!(matches!(
        qmv(&w, &x[..127], 2, &mut y),
        Err(KernelError::Length { what: "x", expected: 128, got: 127, .. })
    ));
    assert!(matches!(qmv(&w, &x, 2, &mut y[..7]), Err(KernelError::Length { what: "y", expected: 8, got: 7, .. })));
    assert!(matches!(qmv(&w, &x, 1, &mut y), Err(KernelError::Length { what: "x", .. })));
    let short = QuantMatrix { packed: &owned.packed[1..], ..w };
    assert!(matches!(
        qmv(&short, &x, 2, &mut y),
        Err(KernelError::Length { what: "packed", expected: 32, got: 31, .. })
    ));
    let few = QuantMatrix { scales: Scales::F32(&owned.scales[1..]), ..w };
    assert!(matches!(qmv(&few, &x, 2, &mut y), Err(KernelError::Length { what: "scales", .. })));
    let few = QuantMatrix { biases: Scales::F16(&[0; 7]), ..w };
    assert!(matches!(qmv(&few, &x, 2, &mut y), Err(KernelError::Length { what: "biases", expected: 8, got: 7, .. })));
    // Mixed storage is fine.
    assert_eq!(qmv(&QuantMatrix { biases: Scales::Bf16(&[0; 8]), ..w }, &x, 2, &mut y), Ok(()));
    assert_eq!(
        qmv(&QuantMatrix { bits: 3, ..w }, &x, 2, &mut y),
        Err(KernelError::Unsupported { bits: 3, group_size: 32 })
    );
    assert_eq!(
        qmv(&QuantMatrix { group_size: 16, ..w }, &x, 2, &mut y),
        Err(KernelError::Unsupported { bits: 4, group_size: 16 })
    );
    assert_eq!(
        qmv(&QuantMatrix { group_size: 128, ..w }, &x, 2, &mut y),
        Err(KernelError::Columns { cols: 64, group_size: 128 })
    );
    let huge = QuantMatrix { rows: usize::MAX / 2, ..w };
    assert!(matches!(qmv(&huge, &x, 2, &mut y), Err(KernelError::Overflow { .. })));
    // Failed calls leave y alone.
    let mut y = vec![7.0; 8];
    let _ = qmv(&short, &x, 2, &mut y);
    assert_eq!(y, vec![7.0; 8]);
    #[cfg(not(target_arch = "aarch64"))]
    assert_eq!(qmv_with(Isa::Neon, 1, &w, &x, 2, &mut y), Err(KernelError::IsaUnavailable(Isa::Neon)));
}

/// The same product and format through MLX itself.
mod mlx {
    use super::*;
    use mlx_rs::{Array, Dtype};

    /// The scales as the kernel takes them: raw bits for 16-bit dtypes.
    fn pick<'a>(dtype: Dtype, f: &'a [f32], h: &'a [u16]) -> Scales<'a> {
        match dtype {
            Dtype::Float16 => Scales::F16(h),
            Dtype::Bfloat16 => Scales::Bf16(h),
            _ => Scales::F32(f),
        }
    }

    fn u16_bits(a: &Array) -> Vec<u16> {
        let v = a.view_dtype(Dtype::Uint16).unwrap();
        v.eval().unwrap();
        v.as_slice::<u16>().to_vec()
    }

    fn f32s(a: &Array) -> Vec<f32> {
        let v = a.as_dtype(Dtype::Float32).unwrap();
        v.eval().unwrap();
        v.as_slice::<f32>().to_vec()
    }

    /// Every f16 and bf16 bit pattern widens as MLX widens it.
    #[test]
    fn half_conversions_match_mlx() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let bits = Array::from_slice(&all, &[all.len() as i32]);
        for (dtype, ours) in [(Dtype::Float16, f16_to_f32 as fn(u16) -> f32), (Dtype::Bfloat16, bf16_to_f32)] {
            let theirs = f32s(&bits.view_dtype(dtype).unwrap());
            for (&h, &t) in all.iter().zip(&theirs) {
                let o = ours(h);
                assert!(o.to_bits() == t.to_bits() || (o.is_nan() && t.is_nan()), "{dtype:?} {h:#06x}: {o} vs {t}");
            }
        }
    }

    /// quantize -> our kernels vs MLX's dequantize and quantized_matmul, for
    /// 4 and 8 bits, group sizes 32/64/128, f32/f16/bf16 scales, m = 1, 2, 8.
    #[test]
    fn matches_mlx_quantized_matmul() {
        let (rows, cols) = (67, 384);
        let key = mlx_rs::random::key(7).unwrap();
        let dense = mlx_rs::random::normal::<f32>(&[rows as i32, cols as i32], None, None, &key).unwrap();
        let mut cases = 0;
        for bits in [4u32, 8] {
            for g in [32usize, 64, 128] {
                for dtype in [Dtype::Float32, Dtype::Float16, Dtype::Bfloat16] {
                    let (packed, scales, biases) =
                        mlx_rs::ops::quantize(dense.as_dtype(dtype).unwrap(), g as i32, bits as i32).unwrap();
                    packed.eval().unwrap();
                    assert_eq!(scales.dtype(), dtype);
                    let packed_v = packed.as_slice::<u32>().to_vec();
                    let (s32, b32) = (f32s(&scales), f32s(&biases));
                    let (s16, b16) =
                        if dtype == Dtype::Float32 { (vec![], vec![]) } else { (u16_bits(&scales), u16_bits(&biases)) };
                    let w = QuantMatrix {
                        packed: &packed_v,
                        scales: pick(dtype, &s32, &s16),
                        biases: pick(dtype, &b32, &b16),
                        rows,
                        cols,
                        group_size: g,
                        bits,
                    };

                    // The bit order: MLX's dequantize equals ours.
                    let deq = mlx_rs::ops::dequantize(
                        &packed,
                        scales.as_dtype(Dtype::Float32).unwrap(),
                        &biases.as_dtype(Dtype::Float32).unwrap(),
                        g as i32,
                        bits as i32,
                    )
                    .unwrap();
                    let deq = f32s(&deq);
                    for (i, (&a, b)) in deq.iter().zip(dense_f64(&w)).enumerate() {
                        assert!(
                            (a as f64 - b).abs() <= 1e-6 * b.abs().max(1.0),
                            "{bits}-bit g{g} {dtype:?} W[{i}]: mlx {a} vs ours {b}"
                        );
                    }

                    for m in [1usize, 2, 8] {
                        let x = mlx_rs::random::normal::<f32>(
                            &[m as i32, cols as i32],
                            None,
                            None,
                            &mlx_rs::random::key(m as u64).unwrap(),
                        )
                        .unwrap();
                        // MLX in f32 throughout (16-bit scales widened exactly), our kernel on the raw bits.
                        let want = mlx_rs::ops::quantized_matmul(
                            &x,
                            &packed,
                            scales.as_dtype(Dtype::Float32).unwrap(),
                            &biases.as_dtype(Dtype::Float32).unwrap(),
                            true,
                            g as i32,
                            bits as i32,
                        )
                        .unwrap();
                        let want = f32s(&want);
                        let xv = f32s(&x);
                        let norm = want.iter().fold(0.0f32, |a, &b| a.max(b.abs()));
                        for isa in available_isas() {
                            let mut y = vec![f32::NAN; m * rows];
                            qmv_with(isa, 1, &w, &xv, m, &mut y).unwrap();
                            for (i, (&a, &b)) in y.iter().zip(&want).enumerate() {
                                assert!(
                                    (a - b).abs() <= 1e-4 * norm,
                                    "{isa:?} {bits}-bit g{g} {dtype:?} m={m} y[{i}]: ours {a} vs mlx {b}"
                                );
                            }
                        }
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 2 * 3 * 3 * 3);
    }
}
