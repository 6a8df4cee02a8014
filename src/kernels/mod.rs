//! CPU fast paths, each beside a plain scalar reference it is tested against;
//! the instruction set is chosen once at run time.
//!
//! `unsafe` is allowed only in the per-architecture files (`x86.rs`,
//! `aarch64.rs`: SIMD intrinsics) and in `pool.rs` (one lifetime erasure for
//! a persistent thread pool); everything else here is safe code.

#[allow(unsafe_code)]
mod pool;
pub mod qmv;

pub use qmv::{
    available_isas, qmv, qmv_scalar, qmv_with, selected_isa, Isa, KernelError, QuantMatrix, Scales, MAX_M,
    PARALLEL_MIN_WORK,
};
