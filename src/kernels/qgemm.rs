//! `x W^T` for many activation rows (prompt chunks) with W quantized: W is
//! dequantized a panel of rows at a time into one buffer that is reused and
//! stays in cache, and each panel goes through a BLAS product. The values
//! are those of dequantizing the whole matrix first (the same `q * scale +
//! bias` in f32, the same BLAS sums per output), without writing the whole
//! f32 matrix (4.4 GB per chunk for a 1.1B model) to fresh memory for
//! every chunk, which was half the prefill's time in page faults.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::qmv::{dequantize_rows, KernelError, QuantMatrix};

/// Bytes of f32 weights dequantized at once: a few MB, well inside the L3
/// cache here (32 MB), large enough that each BLAS call has work for both
/// cores (at 512 rows of x, a 2048-wide panel of 512 rows is 1 GFLOP).
pub const PANEL_BYTES: usize = 4 << 20;

/// A BLAS product `c[i * ldc + j] = sum_k a[i * k + k'] * b[j * k + k']`
/// (`A B^T`, `a: [m, k]`, `b: [n, k]`), true when it ran.
pub type Gemm<'a> = &'a dyn Fn(usize, usize, usize, &[f32], &[f32], &mut [f32], usize) -> bool;

/// Rows of W per panel for `cols` columns: a multiple of 16, at least 16.
pub fn panel_rows(rows: usize, cols: usize) -> usize {
    let r = (PANEL_BYTES / 4 / cols.max(1)) / 16 * 16;
    r.clamp(16, rows.max(16))
}

/// Why a product was refused (nothing useful is in `y` then).
#[derive(Debug, thiserror::Error)]
pub enum GemmError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("x has {got} elements; {m} rows of {cols} need {expected}")]
    X { got: usize, m: usize, cols: usize, expected: usize },
    #[error("y has {got} elements; {m} rows of {rows} need {expected}")]
    Y { got: usize, m: usize, rows: usize, expected: usize },
    #[error("the BLAS product failed")]
    Blas,
}

/// Nanoseconds spent dequantizing panels since the process started: a
/// prompt chunk's fixed cost (the same whatever its length), which the
/// scheduler weighs when it sizes chunks.
static DEQUANT_NANOS: AtomicU64 = AtomicU64::new(0);

/// [`DEQUANT_NANOS`] now.
pub fn dequant_nanos() -> u64 {
    DEQUANT_NANOS.load(Ordering::Relaxed)
}

thread_local! {
    /// The panel buffer, kept between calls (one per calling thread).
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `y[i][r] = sum_c x[i][c] * W[r][c]` for `x: [m, cols]`, `y: [m, rows]`,
/// row-major f32, any `m`.
pub fn qgemm(w: &QuantMatrix, x: &[f32], m: usize, y: &mut [f32], gemm: Gemm) -> Result<(), GemmError> {
    let (rows, cols) = (w.rows, w.cols);
    if x.len() != m * cols {
        return Err(GemmError::X { got: x.len(), m, cols, expected: m * cols });
    }
    if y.len() != m * rows {
        return Err(GemmError::Y { got: y.len(), m, rows, expected: m * rows });
    }
    if m == 0 || rows == 0 {
        return Ok(());
    }
    let np = panel_rows(rows, cols);
    PANEL.with(|p| {
        let mut panel = p.borrow_mut();
        if panel.len() < np * cols {
            panel.resize(np * cols, 0.0);
        }
        for r0 in (0..rows).step_by(np) {
            let n = np.min(rows - r0);
            let part = &mut panel[..n * cols];
            let t = Instant::now();
            dequantize_rows(w, r0, part)?;
            DEQUANT_NANOS.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            if !gemm(m, n, cols, x, part, &mut y[r0..], rows) {
                return Err(GemmError::Blas);
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::qmv::{dequantize, Scales};

    /// The plain product, in f64.
    fn reference(w: &[f32], rows: usize, cols: usize, x: &[f32], m: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * rows];
        for i in 0..m {
            for r in 0..rows {
                y[i * rows + r] = (0..cols).map(|c| x[i * cols + c] as f64 * w[r * cols + c] as f64).sum();
            }
        }
        y
    }

    /// A plain `A B^T` standing in for BLAS.
    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32], ldc: usize) -> bool {
        for i in 0..m {
            for j in 0..n {
                c[i * ldc + j] = (0..k).map(|t| a[i * k + t] * b[j * k + t]).sum();
            }
        }
        true
    }

    fn lcg(seed: &mut u64) -> u32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    }

    fn matrix(rows: usize, cols: usize, bits: u32, group: usize, seed: u64) -> (Vec<u32>, Vec<f32>, Vec<f32>) {
        let mut s = seed;
        let packed = (0..rows * cols * bits as usize / 32).map(|_| lcg(&mut s)).collect();
        let groups = rows * cols / group;
        let scales = (0..groups).map(|_| (lcg(&mut s) % 1000) as f32 * 1e-5 + 1e-3).collect();
        let biases = (0..groups).map(|_| (lcg(&mut s) % 1000) as f32 * 1e-4 - 0.05).collect();
        (packed, scales, biases)
    }

    #[test]
    fn panels_give_the_whole_matrix_product() {
        // Rows that do not fill the last panel, panels of 16 rows (wide
        // columns), every bit width and group size the kernels take.
        for (rows, cols, bits, group, m) in [(40, 64, 4, 32, 3), (1000, 8192, 4, 64, 5), (33, 256, 8, 128, 40), (17, 128, 4, 32, 1)] {
            let (packed, scales, biases) = matrix(rows, cols, bits, group, rows as u64 * 7 + cols as u64);
            let w = QuantMatrix { packed: &packed, scales: Scales::F32(&scales), biases: Scales::F32(&biases), rows, cols, group_size: group, bits };
            let mut dense = vec![0f32; rows * cols];
            dequantize(&w, &mut dense).unwrap();
            let mut s = 99;
            let x: Vec<f32> = (0..m * cols).map(|_| (lcg(&mut s) % 2001) as f32 / 1000.0 - 1.0).collect();
            let want = reference(&dense, rows, cols, &x, m);
            let mut y = vec![f32::NAN; m * rows];
            qgemm(&w, &x, m, &mut y, &naive).unwrap();
            let worst = y.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
            assert!(worst < 1e-3, "{rows}x{cols} {bits}-bit g{group} m={m}: off by {worst}");
            // The process's BLAS, where one is loaded (OpenBLAS in kvserve's executables).
            if crate::mlx::os::has_sgemm() {
                let mut b = vec![f32::NAN; m * rows];
                qgemm(&w, &x, m, &mut b, &crate::mlx::os::sgemm_nt).unwrap();
                let worst = b.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
                assert!(worst < 1e-3, "BLAS: {rows}x{cols} m={m}: off by {worst}");
            }
        }
    }

    #[test]
    fn bad_lengths_are_refused() {
        let (packed, scales, biases) = matrix(16, 64, 4, 32, 1);
        let w = QuantMatrix { packed: &packed, scales: Scales::F32(&scales), biases: Scales::F32(&biases), rows: 16, cols: 64, group_size: 32, bits: 4 };
        let mut y = vec![0f32; 32];
        assert!(matches!(qgemm(&w, &[0.0; 100], 2, &mut y, &naive), Err(GemmError::X { .. })));
        assert!(matches!(qgemm(&w, &[0.0; 128], 2, &mut y[..31], &naive), Err(GemmError::Y { .. })));
        assert!(matches!(qgemm(&w, &[0.0; 128], 2, &mut y, &|_, _, _, _, _, _, _| false), Err(GemmError::Blas)));
    }

    #[test]
    fn panels_fit_the_buffer() {
        assert_eq!(panel_rows(8192, 2048), 512);
        assert_eq!(panel_rows(2048, 8192), 128);
        assert_eq!(panel_rows(10, 1 << 20), 16, "at least 16 rows");
        assert_eq!(panel_rows(100, 64), 100, "a small matrix is one panel");
    }
}
