//! The MLX bridge: real MLX ops through mlx-c, with values that can be wrong.

use kvserve::mlx::{self, Array, QuantizedMatrix};

fn values(a: &Array) -> Vec<f32> {
    a.eval().unwrap();
    a.as_slice::<f32>().to_vec()
}

#[test]
fn matmul_known_values() {
    let a = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    let b = Array::from_slice(&[7.0f32, 8.0, 9.0, 10.0, 11.0, 12.0], &[3, 2]);
    let c = a.matmul(&b).unwrap();
    assert_eq!(c.shape(), &[2, 2]);
    assert_eq!(values(&c), vec![58.0, 64.0, 139.0, 154.0]);
}

#[test]
fn large_matmul_matches_a_plain_loop() {
    // Big enough to go through BLAS; checked against a straightforward loop.
    let (m, k, n) = (65usize, 130usize, 33usize);
    let av: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 4.0).collect();
    let bv: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 8.0).collect();
    let a = Array::from_slice(&av, &[m as i32, k as i32]);
    let b = Array::from_slice(&bv, &[k as i32, n as i32]);
    let got = values(&a.matmul(&b).unwrap());
    for i in 0..m {
        for j in 0..n {
            let want: f32 = (0..k).map(|t| av[i * k + t] * bv[t * n + j]).sum();
            assert!((got[i * n + j] - want).abs() < 1e-3, "({i},{j}): {} vs {want}", got[i * n + j]);
        }
    }
}

/// Rows whose groups hold exactly the 16 levels `bias + q * scale`, so 4-bit
/// affine quantization is lossless and every output is known in advance.
/// The bias is the group's minimum and the larger magnitude (MLX anchors the
/// grid at the edge of larger magnitude), and a whole multiple of the scale.
fn scale_of(row: usize, group: usize) -> f32 {
    0.5 * (1 + (row + group) % 3) as f32
}

fn exact_4bit_matrix(rows: usize, cols: usize) -> Vec<f32> {
    let mut w = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let group = c / 64;
            let scale = scale_of(r, group);
            let bias = -scale * (8 + r + group) as f32;
            // Each group covers all levels 0..=15, so min and max fix scale and bias.
            let q = (c % 16) as f32;
            w.push(bias + q * scale);
        }
    }
    w
}

#[test]
fn quantize_round_trip_known_values() {
    let (rows, cols) = (4usize, 128usize);
    let wv = exact_4bit_matrix(rows, cols);
    let w = Array::from_slice(&wv, &[rows as i32, cols as i32]);
    let q = QuantizedMatrix::quantize(&w, 64, 4).unwrap();
    assert_eq!(q.packed.shape(), &[4, 16]);
    assert_eq!(q.scales.shape(), &[4, 2]);
    assert_eq!(q.shape(), (4, 128));

    // Scales and biases are exactly the ones the matrix was built from.
    let scales = values(&q.scales);
    let biases = values(&q.biases);
    for r in 0..rows {
        for g in 0..2 {
            assert_eq!(scales[r * 2 + g], scale_of(r, g), "scale r{r} g{g}");
            assert_eq!(biases[r * 2 + g], -scale_of(r, g) * (8 + r + g) as f32, "bias r{r} g{g}");
        }
    }
    // Levels 0..7 then 8..15, 4 bits each, lowest nibble first.
    q.packed.eval().unwrap();
    let packed = q.packed.as_slice::<u32>();
    assert_eq!(packed[0], 0x7654_3210);
    assert_eq!(packed[1], 0xFEDC_BA98);

    // Dequantize gives the matrix back exactly.
    assert_eq!(values(&q.dequantize().unwrap()), wv);

    // quantized_matmul computes x @ W^T; compare with a plain loop over the known W.
    let xv: Vec<f32> = (0..2 * cols).map(|i| ((i % 9) as f32 - 4.0) / 2.0).collect();
    let x = Array::from_slice(&xv, &[2, cols as i32]);
    let y = values(&q.matmul(&x).unwrap());
    assert_eq!(y.len(), 2 * rows);
    for i in 0..2 {
        for r in 0..rows {
            let want: f32 = (0..cols).map(|c| xv[i * cols + c] * wv[r * cols + c]).sum();
            assert!((y[i * rows + r] - want).abs() < 1e-3, "y[{i},{r}] = {} want {want}", y[i * rows + r]);
        }
    }
}

#[test]
fn quantize_8bit_group_32_is_close() {
    let wv: Vec<f32> = (0..64 * 96).map(|i| (((i * 37) % 101) as f32 - 50.0) / 40.0).collect();
    let w = Array::from_slice(&wv, &[64, 96]);
    let q = QuantizedMatrix::quantize(&w, 32, 8).unwrap();
    let back = values(&q.dequantize().unwrap());
    let worst = wv.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let mean = wv.iter().zip(&back).map(|(a, b)| (a - b).abs()).sum::<f32>() / wv.len() as f32;
    // Values span 2.5, so one 8-bit step is about 0.0098. MLX anchors the grid at
    // the edge of larger magnitude, which can cost up to one step at the far
    // edge; rounding costs a quarter step on average.
    assert!(worst < 0.0099, "worst error {worst}");
    assert!(mean < 0.0035, "mean error {mean}");
    assert!(worst > 0.0, "8-bit quantization of these values cannot be exact");
}

#[test]
fn shape_mismatch_is_an_err_with_mlx_message() {
    let a = Array::from_slice(&[1.0f32; 6], &[2, 3]);
    let b = Array::from_slice(&[1.0f32; 8], &[4, 2]);
    let err = mlx::MlxError::from(a.matmul(&b).unwrap_err());
    assert!(err.message.contains("matmul"), "{err}");
    assert!(err.message.contains("(2,3)") && err.message.contains("(4,2)"), "{err}");
    // The process keeps working after the error.
    assert_eq!(values(&a.matmul(Array::from_slice(&[1.0f32; 3], &[3, 1])).unwrap()), vec![3.0, 3.0]);
}

#[test]
fn quantize_bad_group_is_an_err() {
    let w = Array::from_slice(&[1.0f32; 4 * 48], &[4, 48]);
    let err = QuantizedMatrix::quantize(&w, 64, 4).unwrap_err();
    assert!(!err.message.is_empty());
    assert!(err.to_string().starts_with("MLX: "), "{err}");
}

#[test]
fn cblas_sgemm_comes_from_openblas() {
    let provider = mlx::blas_provider().expect("cblas_sgemm is loaded (libmlx needs it)");
    let name = provider.file_name().unwrap().to_string_lossy().to_string();
    assert!(name.contains("openblas"), "cblas_sgemm resolves to {}", provider.display());
}

#[test]
fn mlx_version_is_pinned() {
    assert_eq!(mlx::version().unwrap(), "0.32.2");
}
