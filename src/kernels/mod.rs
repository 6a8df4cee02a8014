//! CPU fast paths, each beside a plain scalar reference it is tested against;
//! the instruction set is chosen once at run time.
//!
//! `unsafe` is allowed only in the per-architecture files (`x86.rs`,
//! `aarch64.rs`: SIMD intrinsics) and in `pool.rs` (one lifetime erasure for
//! a persistent thread pool); everything else here is safe code.

pub mod attn;
#[allow(unsafe_code)]
mod pool;
pub mod qgemm;
pub mod qmv;

pub use qmv::{
    available_isas, dequantize, qmv, widen_f16, qmv_scalar, qmv_with, selected_isa, Isa, KernelError, QuantMatrix, Scales, MAX_M,
    PARALLEL_MIN_WORK,
};

/// `e^x` for `x <= 0` in f32, branch-free so loops over it vectorize:
/// `x = n ln2 + r` with `|r| <= ln2/2`, `e^r` by its Taylor series to `r^7`
/// (relative error under 1e-8 there), `2^n` built from the exponent bits.
/// Below -87 the result is flushed to about 1e-38, far under any softmax term.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.max(-87.0);
    let k = x * std::f32::consts::LOG2_E + ROUND;
    let n = k - ROUND;
    let r = (x - n * 0.693_359_4) + n * 2.121_944_4e-4; // ln 2 split in two for exactness
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let e = (k.to_bits() as i32 - ROUND.to_bits() as i32 + 127) as u32;
    p * f32::from_bits(e << 23)
}

/// `x = e^(x - max)` over `row` in place (every `x <= max`); returns their
/// sum, kept in eight lanes so the loop vectorizes.
#[inline]
pub fn exp_shifted_sum(row: &mut [f32], max: f32) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for (x, l) in c.iter_mut().zip(lanes.iter_mut()) {
            *x = exp_nonpositive(*x - max);
            *l += *x;
        }
    }
    for x in chunks.into_remainder() {
        *x = exp_nonpositive(*x - max);
        lanes[0] += *x;
    }
    lanes.iter().sum()
}
