//! Quantized matrix-vector products over MLX's affine quantization, for the
//! CPU decode path (1 to 8 activation rows).
//!
//! Format (what `mlx_rs::ops::quantize(w, group_size, bits)` returns for a
//! dense `[rows, cols]` W): `packed` is u32 `[rows, cols * bits / 32]` with
//! value `k` of a word at bits `k * bits ..` (so, on a little-endian machine,
//! byte `c * bits / 8` of a row holds column `c`, low nibble first);
//! `scales` and `biases` are `[rows, cols / group_size]` and
//! `W[r][c] = scales[r][c / g] * q[r][c] + biases[r][c / g]`.
//! The bit order is checked against MLX's own `dequantize` in the tests.
//!
//! Every path dequantizes a weight as `q * scale + bias` in f32 and
//! accumulates `x * w` in f32. The SIMD paths read x in a per-call permuted
//! order that matches their nibble unpacking (see [`Impl::perm_block`]).

mod scalar;

/// For the SIMD files: calls `$kernel::<$bits, M>` with the const `M` equal to `job.m`.
macro_rules! by_m {
    ($kernel:ident, $bits:literal, $job:expr, $r0:expr, $out:expr) => {{
        let job: &Job = $job;
        match job.m {
            1 => $kernel::<$bits, 1>(job, $r0, $out),
            2 => $kernel::<$bits, 2>(job, $r0, $out),
            3 => $kernel::<$bits, 3>(job, $r0, $out),
            4 => $kernel::<$bits, 4>(job, $r0, $out),
            // Four rows, then the rest: every row's sums are computed the
            // same way whatever M is, with the accumulators in registers.
            m @ 5..=8 => {
                let cols = job.w.cols;
                let (head, tail) = $out.split_at_mut(4);
                $kernel::<$bits, 4>(&Job { w: job.w, x: &job.x[..4 * cols], m: 4 }, $r0, head);
                let rest = Job { w: job.w, x: &job.x[4 * cols..], m: m - 4 };
                match m - 4 {
                    1 => $kernel::<$bits, 1>(&rest, $r0, tail),
                    2 => $kernel::<$bits, 2>(&rest, $r0, tail),
                    3 => $kernel::<$bits, 3>(&rest, $r0, tail),
                    _ => $kernel::<$bits, 4>(&rest, $r0, tail),
                }
            }
            m => unreachable!("m = {m} passed validation"),
        }
    }};
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86;

#[cfg(target_arch = "aarch64")]
#[allow(unsafe_code)]
mod aarch64;

use std::borrow::Cow;
use std::sync::{Mutex, OnceLock};

use super::pool::Pool;

/// Scales or biases of a quantized matrix, `[rows, cols / group_size]`.
/// The 16-bit variants hold raw IEEE half / bfloat16 bits.
#[derive(Debug, Clone, Copy)]
pub enum Scales<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
    Bf16(&'a [u16]),
}

impl Scales<'_> {
    /// Number of stored values.
    pub fn len(&self) -> usize {
        match self {
            Scales::F32(s) => s.len(),
            Scales::F16(s) | Scales::Bf16(s) => s.len(),
        }
    }

    /// Whether no values are stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Value `i` widened to f32.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Scales::F32(s) => s[i],
            Scales::F16(s) => f16_to_f32(s[i]),
            Scales::Bf16(s) => bf16_to_f32(s[i]),
        }
    }
}

/// A borrowed `[rows, cols]` weight matrix in MLX's affine quantization.
#[derive(Debug, Clone, Copy)]
pub struct QuantMatrix<'a> {
    /// Packed values, u32 `[rows, cols * bits / 32]`.
    pub packed: &'a [u32],
    /// One scale per group, `[rows, cols / group_size]`.
    pub scales: Scales<'a>,
    /// One bias per group, `[rows, cols / group_size]`.
    pub biases: Scales<'a>,
    /// Output features.
    pub rows: usize,
    /// Input features (a multiple of `group_size`).
    pub cols: usize,
    /// Values sharing one scale and bias: 32, 64 or 128.
    pub group_size: usize,
    /// Bits per value: 4 or 8.
    pub bits: u32,
}

impl QuantMatrix<'_> {
    /// Bytes a product reads from this matrix: packed values, scales and biases.
    pub fn weight_bytes(&self) -> usize {
        let width = |s: &Scales| match s {
            Scales::F32(_) => 4,
            _ => 2,
        };
        self.packed.len() * 4 + self.scales.len() * width(&self.scales) + self.biases.len() * width(&self.biases)
    }
}

/// Why a product was refused. Nothing is written to `y` in that case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    #[error("unsupported quantization: {bits} bits with group size {group_size} (supported: 4 or 8 bits, group size 32, 64 or 128)")]
    Unsupported { bits: u32, group_size: usize },
    #[error("{cols} columns is not a multiple of the group size {group_size}")]
    Columns { cols: usize, group_size: usize },
    #[error("{what} has {got} elements; a {rows}x{cols} matrix with m = {m} needs {expected}")]
    Length { what: &'static str, expected: usize, got: usize, rows: usize, cols: usize, m: usize },
    #[error("m = {0} activation rows; supported 1 to 8")]
    Batch(usize),
    #[error("matrix of {rows}x{cols} is too large to index")]
    Overflow { rows: usize, cols: usize },
    #[error("instruction set {0:?} is not available on this CPU")]
    IsaUnavailable(Isa),
}

/// Most activation rows one call takes.
pub const MAX_M: usize = 8;

/// The instruction sets a product can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Plain Rust, the reference.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512F.
    Avx512,
    /// AArch64 NEON.
    Neon,
}

/// What one product needs after validation: the matrix and x in the order
/// the chosen path reads it.
pub(crate) struct Job<'a> {
    pub w: &'a QuantMatrix<'a>,
    /// `[m, cols]`, permuted in blocks of `perm_block` for 4-bit SIMD paths.
    pub x: &'a [f32],
    pub m: usize,
}

/// Computes rows `r0 .. r0 + out[0].len()` of every activation row:
/// `out[j][i] = y[j][r0 + i]`. `out.len() == job.m`. The caller has checked
/// every length (see `validate`) and that the rows lie inside the matrix.
pub(crate) type RowsFn = fn(job: &Job, r0: usize, out: &mut [&mut [f32]]);

/// One instruction set's kernels.
#[derive(Clone, Copy)]
pub(crate) struct Impl {
    pub isa: Isa,
    /// 4-bit paths read x in blocks of this many columns: first the even
    /// columns (low nibbles of consecutive bytes), then the odd ones. 0: natural order.
    pub perm_block: usize,
    pub rows4: RowsFn,
    pub rows8: RowsFn,
}

const SCALAR: Impl = Impl { isa: Isa::Scalar, perm_block: 0, rows4: scalar::rows, rows8: scalar::rows };

/// A product is split across the thread pool when `weight_bytes * (m + 1)`
/// reaches this (from 96 KiB of weights at m = 1, 21 KiB at m = 8).
/// Measured in benches/qmv.rs: handing a job to the pool's spinning workers
/// costs ~1-2 us; 576x576 4-bit at m = 1 goes from 17 us on one core to 13 us
/// on two, the 83 KB k/v projection gains nothing at m = 1 (6.5 us) but does
/// at m = 8 (20 -> 17.6 us). Scoped threads would cost ~60 us a call.
pub const PARALLEL_MIN_WORK: usize = 192 << 10;

/// Most threads one product uses.
pub(crate) const MAX_THREADS: usize = 16;

fn impl_for(isa: Isa) -> Option<Impl> {
    match isa {
        Isa::Scalar => Some(SCALAR),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => x86::avx512(),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86::avx2(),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => aarch64::neon(),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// Instruction sets this CPU can run, best first (Scalar always last).
pub fn available_isas() -> Vec<Isa> {
    [Isa::Avx512, Isa::Avx2, Isa::Neon, Isa::Scalar].into_iter().filter(|&i| impl_for(i).is_some()).collect()
}

/// The dispatched kernels, chosen once: the best available, or what
/// `KVSERVE_KERNELS` (`scalar`, `avx2`, `avx512`, `neon`) names.
fn selected() -> &'static Impl {
    static SELECTED: OnceLock<Impl> = OnceLock::new();
    SELECTED.get_or_init(|| {
        let best = impl_for(available_isas()[0]).unwrap_or(SCALAR);
        let Ok(want) = std::env::var("KVSERVE_KERNELS") else { return best };
        let isa = match want.to_ascii_lowercase().as_str() {
            "scalar" | "ref" => Isa::Scalar,
            "avx2" => Isa::Avx2,
            "avx512" => Isa::Avx512,
            "neon" => Isa::Neon,
            "" | "auto" => return best,
            other => {
                tracing::warn!(
                    "KVSERVE_KERNELS={other} is not one of scalar, avx2, avx512, neon; using {:?}",
                    best.isa
                );
                return best;
            }
        };
        impl_for(isa).unwrap_or_else(|| {
            tracing::warn!("KVSERVE_KERNELS asks for {isa:?}, which this CPU lacks; using {:?}", best.isa);
            best
        })
    })
}

/// The instruction set [`qmv`] uses.
pub fn selected_isa() -> Isa {
    selected().isa
}

/// `y[j][r] = sum_c x[j][c] * W[r][c]` for `x: [m, cols]` and `y: [m, rows]`,
/// both row-major f32, `1 <= m <= 8`, on the dispatched instruction set,
/// split across threads when the work is large (see [`PARALLEL_MIN_WORK`]).
pub fn qmv(w: &QuantMatrix, x: &[f32], m: usize, y: &mut [f32]) -> Result<(), KernelError> {
    validate(w, x, m, y)?;
    run(selected(), w, x, m, y, auto_threads(w, m));
    Ok(())
}

/// The dense `[rows, cols]` f32 matrix `w` stands for (`q * scale + bias`),
/// into `out`, rows split across the thread pool: for the CPU prefill's
/// BLAS products, where MLX's own CPU `dequantize` (built of generic copy
/// and shift ops, on one thread) took about a quarter of a second per
/// prompt chunk for SmolLM2's matrices here.
pub fn dequantize(w: &QuantMatrix, out: &mut [f32]) -> Result<(), KernelError> {
    let n = validate_lengths(w, 1)?;
    length("out", n, out.len(), w, 1)?;
    dequantize_rows(w, 0, out)
}

/// Rows `r0 .. r0 + out.len() / cols` of [`dequantize`]'s matrix into `out`
/// (whole rows), split across the thread pool as it does.
pub fn dequantize_rows(w: &QuantMatrix, r0: usize, out: &mut [f32]) -> Result<(), KernelError> {
    validate_format(w)?;
    validate_lengths(w, 1)?;
    if w.cols == 0 || out.is_empty() {
        return Ok(());
    }
    let rows = out.len() / w.cols;
    if out.len() % w.cols != 0 || r0 + rows > w.rows {
        return Err(KernelError::Length { what: "out", expected: (w.rows - r0.min(w.rows)) * w.cols, got: out.len(), rows: w.rows, cols: w.cols, m: 1 });
    }
    let simd = selected().isa != Isa::Scalar;
    let rows_fn = |r0: usize, part: &mut [f32]| {
        #[cfg(target_arch = "x86_64")]
        if simd && x86::dequant_rows_avx2(w, r0, part).is_some() {
            return;
        }
        let _ = simd;
        scalar::dequant_rows(w, r0, part);
    };
    // Pieces of at least 16 rows, several per thread.
    let pool = Pool::global(MAX_THREADS);
    let chunk = rows.div_ceil((4 * pool.threads()).clamp(1, rows.div_ceil(16)));
    pool.each(out.chunks_mut(chunk * w.cols).collect(), &|p, part| rows_fn(r0 + p * chunk, part));
    Ok(())
}

/// `dst[i] = src[i]` widened from f16 bits to f32, in pieces across the
/// thread pool: the CPU prefill's attention reads the f16 KV cache this way
/// (MLX's cast of a slice of the buffer is a strided copy on one thread:
/// about 0.15 s per chunk at 12K cached tokens for SmolLM2).
pub fn widen_f16(src: &[u16], dst: &mut [f32]) -> Result<(), KernelError> {
    if src.len() != dst.len() {
        return Err(KernelError::Length { what: "dst", expected: src.len(), got: dst.len(), rows: 1, cols: src.len(), m: 1 });
    }
    const PIECE: usize = 1 << 16;
    Pool::global(MAX_THREADS).each(src.chunks(PIECE).zip(dst.chunks_mut(PIECE)).collect(), &|_, (s, d)| widen_f16_here(s, d));
    Ok(())
}

/// [`widen_f16`] on this thread (AVX2 + F16C where the CPU has them and
/// `KVSERVE_KERNELS` allows SIMD); the shorter of the two lengths.
pub(crate) fn widen_f16_here(src: &[u16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let (src, dst) = (&src[..n], &mut dst[..n]);
    #[cfg(target_arch = "x86_64")]
    if selected().isa != Isa::Scalar && x86::widen_f16_avx2(src, dst).is_some() {
        return;
    }
    dst.iter_mut().zip(src).for_each(|(d, &h)| *d = f16_to_f32(h));
}

/// [`qmv`] on the scalar reference, single-threaded.
pub fn qmv_scalar(w: &QuantMatrix, x: &[f32], m: usize, y: &mut [f32]) -> Result<(), KernelError> {
    qmv_with(Isa::Scalar, 1, w, x, m, y)
}

/// [`qmv`] on a chosen instruction set and thread count (0: choose as [`qmv`] does).
pub fn qmv_with(
    isa: Isa,
    threads: usize,
    w: &QuantMatrix,
    x: &[f32],
    m: usize,
    y: &mut [f32],
) -> Result<(), KernelError> {
    let imp = impl_for(isa).ok_or(KernelError::IsaUnavailable(isa))?;
    validate(w, x, m, y)?;
    let threads = if threads == 0 { auto_threads(w, m) } else { threads.min(MAX_THREADS) };
    run(&imp, w, x, m, y, threads);
    Ok(())
}

fn auto_threads(w: &QuantMatrix, m: usize) -> usize {
    static CPUS: OnceLock<usize> = OnceLock::new();
    if w.weight_bytes().saturating_mul(m + 1) < PARALLEL_MIN_WORK {
        return 1;
    }
    let cpus = *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    cpus.clamp(1, MAX_THREADS)
}

/// Checks every shape so that the kernels may index without bounds checks.
fn validate(w: &QuantMatrix, x: &[f32], m: usize, y: &[f32]) -> Result<(), KernelError> {
    let (rows, cols) = (w.rows, w.cols);
    validate_format(w)?;
    if !(1..=MAX_M).contains(&m) {
        return Err(KernelError::Batch(m));
    }
    validate_lengths(w, m)?;
    let overflow = KernelError::Overflow { rows, cols };
    let x_len = m.checked_mul(cols).ok_or(overflow.clone())?;
    let y_len = m.checked_mul(rows).ok_or(overflow)?;
    length("x", x_len, x.len(), w, m)?;
    length("y", y_len, y.len(), w, m)
}

/// The bit width and group size the kernels take, and whole groups per row.
fn validate_format(w: &QuantMatrix) -> Result<(), KernelError> {
    let (cols, g) = (w.cols, w.group_size);
    if !matches!(w.bits, 4 | 8) || !matches!(g, 32 | 64 | 128) {
        return Err(KernelError::Unsupported { bits: w.bits, group_size: g });
    }
    if cols % g != 0 {
        return Err(KernelError::Columns { cols, group_size: g });
    }
    Ok(())
}

/// The matrix's packed values, scales and biases against its rows and
/// columns (`m`: the activation rows, for the error); its element count.
fn validate_lengths(w: &QuantMatrix, m: usize) -> Result<usize, KernelError> {
    let (rows, cols, g) = (w.rows, w.cols, w.group_size);
    // Bounds on rows * cols keep every product below (and the kernels' pointer offsets) in range.
    let elems = rows.checked_mul(cols).filter(|&n| n <= isize::MAX as usize / 8).ok_or(KernelError::Overflow { rows, cols })?;
    length("packed", elems / 32 * w.bits as usize, w.packed.len(), w, m)?;
    length("scales", elems / g, w.scales.len(), w, m)?;
    length("biases", elems / g, w.biases.len(), w, m)?;
    Ok(elems)
}

fn length(what: &'static str, expected: usize, got: usize, w: &QuantMatrix, m: usize) -> Result<(), KernelError> {
    if expected == got {
        Ok(())
    } else {
        Err(KernelError::Length { what, expected, got, rows: w.rows, cols: w.cols, m })
    }
}

/// For the SIMD files: the invariants their unchecked reads and writes rest on (cheap:
/// once per call, not per element). `validate` has already checked the
/// packed, scales, biases and x lengths against rows, cols and m.
pub(crate) fn check(job: &Job, r0: usize, out: &[&mut [f32]]) {
    let w = job.w;
    assert!(matches!(w.group_size, 32 | 64 | 128) && w.cols % w.group_size == 0);
    assert_eq!(w.packed.len(), w.rows * w.cols * w.bits as usize / 32);
    assert_eq!(w.scales.len(), w.rows * (w.cols / w.group_size));
    assert_eq!(w.biases.len(), w.scales.len());
    assert_eq!(job.x.len(), job.m * w.cols);
    assert_eq!(out.len(), job.m);
    let n = out[0].len();
    assert!(out.iter().all(|o| o.len() == n) && r0 + n <= w.rows);
}

/// Runs a validated product on `threads` threads (row ranges, one per
/// thread): on the persistent pool when it has exactly that many parts,
/// else on scoped threads.
fn run(imp: &Impl, w: &QuantMatrix, x: &[f32], m: usize, y: &mut [f32], threads: usize) {
    let (rows, cols) = (w.rows, w.cols);
    if rows == 0 {
        return;
    }
    let x: Cow<[f32]> =
        if w.bits == 4 && imp.perm_block > 0 { Cow::Owned(permute(x, imp.perm_block)) } else { Cow::Borrowed(x) };
    debug_assert_eq!(x.len(), m * cols);
    let rows_fn = if w.bits == 4 { imp.rows4 } else { imp.rows8 };
    let job = Job { w, x: &x, m };

    // The pool takes its own thread count; its rows go in chunks (several
    // per thread, so a descheduled worker costs little) of at least 16 rows.
    let pool = (threads > 1).then(|| Pool::global(MAX_THREADS)).filter(|p| p.threads() == threads);
    let pieces = if pool.is_some() { 4 * threads } else { threads };
    let chunk = rows.div_ceil(pieces.clamp(1, rows.div_ceil(16)));
    let pieces = rows.div_ceil(chunk);
    let mut parts: Vec<Vec<&mut [f32]>> = (0..pieces).map(|_| Vec::with_capacity(m)).collect();
    for yj in y.chunks_mut(rows) {
        for (part, piece) in parts.iter_mut().zip(yj.chunks_mut(chunk)) {
            part.push(piece);
        }
    }
    if pieces == 1 {
        rows_fn(&job, 0, &mut parts[0]);
        return;
    }
    if let Some(pool) = pool {
        let parts: Vec<Mutex<Vec<&mut [f32]>>> = parts.into_iter().map(Mutex::new).collect();
        let ran =
            pool.run(pieces, &|p| rows_fn(&job, p * chunk, &mut parts[p].lock().unwrap_or_else(|e| e.into_inner())));
        if !ran {
            // Another thread holds the pool: run alone rather than wait.
            for (p, part) in parts.into_iter().enumerate() {
                rows_fn(&job, p * chunk, &mut part.into_inner().unwrap_or_else(|e| e.into_inner()));
            }
        }
        return;
    }
    std::thread::scope(|s| {
        let mut parts = parts.into_iter().enumerate();
        let (_, mut first) = parts.next().expect("at least one part");
        for (i, mut part) in parts {
            let job = &job;
            s.spawn(move || rows_fn(job, i * chunk, &mut part));
        }
        rows_fn(&job, 0, &mut first);
    });
}

/// x with every block of `b` columns reordered to `[even columns, odd columns]`:
/// the order in which low then high nibbles of `b / 2` consecutive bytes come out.
fn permute(x: &[f32], b: usize) -> Vec<f32> {
    let half = b / 2;
    let mut out = vec![0.0; x.len()];
    for (src, dst) in x.chunks_exact(b).zip(out.chunks_exact_mut(b)) {
        for p in 0..half {
            dst[p] = src[2 * p];
            dst[half + p] = src[2 * p + 1];
        }
    }
    out
}

/// IEEE 754 half-precision bits to f32 (exact).
#[inline]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if mant == 0 => sign,
        // Subnormal: mant * 2^-24, exact in f32.
        0 => return f32::from_bits(sign | (mant as f32 * (1.0 / 16_777_216.0)).to_bits()),
        31 => sign | 0x7f80_0000 | (mant << 13),
        _ => sign | ((exp + 112) << 23) | (mant << 13),
    };
    f32::from_bits(bits)
}

/// bfloat16 bits to f32 (exact).
#[inline]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Row `r`'s `n` scales (or biases) as f32: borrowed when stored as f32,
/// else widened into `buf` (of length `n`).
#[inline]
pub(crate) fn row_f32<'s>(sc: &Scales<'s>, r: usize, n: usize, buf: &'s mut [f32]) -> &'s [f32] {
    match *sc {
        Scales::F32(s) => &s[r * n..(r + 1) * n],
        Scales::F16(s) => {
            for (d, &h) in buf.iter_mut().zip(&s[r * n..(r + 1) * n]) {
                *d = f16_to_f32(h);
            }
            buf
        }
        Scales::Bf16(s) => {
            for (d, &h) in buf.iter_mut().zip(&s[r * n..(r + 1) * n]) {
                *d = bf16_to_f32(h);
            }
            buf
        }
    }
}

#[cfg(test)]
mod tests;
