//! AArch64 NEON kernels, the same scheme as the x86 ones: dequantize a block
//! of 16 columns to f32 once, multiply-add it into every activation row.
//! For 4-bit values x comes permuted in blocks of 16 (even columns, then odd).
//! Compiled here with `--target aarch64-unknown-linux-gnu`; not run on this
//! project's x86 machines, so the tests (fast vs scalar) are what vouch for it
//! on Apple silicon.

use std::arch::aarch64::*;

use super::{check, row_f32, Impl, Isa, Job};

/// The NEON kernels (NEON is part of every AArch64 CPU this targets).
pub(super) fn neon() -> Option<Impl> {
    std::arch::is_aarch64_feature_detected!("neon").then_some(Impl {
        isa: Isa::Neon,
        perm_block: 16,
        rows4: rows4_neon,
        rows8: rows8_neon,
    })
}

fn rows4_neon(job: &Job, r0: usize, out: &mut [&mut [f32]]) {
    check(job, r0, out);
    // SAFETY: only `neon()` hands this fn out, after detecting NEON; `validate`
    // and `check` established the lengths the kernel relies on.
    unsafe { by_m!(kernel_neon, 4, job, r0, out) }
}

fn rows8_neon(job: &Job, r0: usize, out: &mut [&mut [f32]]) {
    check(job, r0, out);
    // SAFETY: as in `rows4_neon`.
    unsafe { by_m!(kernel_neon, 8, job, r0, out) }
}

/// # Safety
/// NEON must be available, and `check(job, r0, out)` must hold with `job.m == M`.
#[target_feature(enable = "neon")]
#[allow(clippy::needless_range_loop)] // j indexes several accumulator arrays and x's rows
unsafe fn kernel_neon<const BITS: usize, const M: usize>(job: &Job, r0: usize, out: &mut [&mut [f32]]) {
    let w = job.w;
    let (cols, g) = (w.cols, w.group_size);
    let groups = cols / g;
    let row_bytes = cols * BITS / 8;
    let packed = w.packed.as_ptr() as *const u8;
    let x = job.x.as_ptr();
    let (mut sbuf, mut bbuf) = (vec![0.0f32; groups], vec![0.0f32; groups]);
    for i in 0..out[0].len() {
        let r = r0 + i;
        let s = row_f32(&w.scales, r, groups, &mut sbuf);
        let b = row_f32(&w.biases, r, groups, &mut bbuf);
        // SAFETY (all pointer arithmetic below): r < rows, so the row's
        // row_bytes lie inside `packed`; c + 16 <= cols bounds every read of
        // the row and of x's row j < M (x is [M, cols]).
        let row = packed.add(r * row_bytes);
        let mut acc0 = [vdupq_n_f32(0.0); M];
        let mut acc1 = [vdupq_n_f32(0.0); M];
        for gi in 0..groups {
            let sv = vdupq_n_f32(s[gi]);
            let bv = vdupq_n_f32(b[gi]);
            for c in (gi * g..(gi + 1) * g).step_by(16) {
                // Four u16x4 halves holding the block's 16 values in x's order.
                let (a, bq) = if BITS == 4 {
                    let v = vld1_u8(row.add(c / 2));
                    (vmovl_u8(vand_u8(v, vdup_n_u8(0xf))), vmovl_u8(vshr_n_u8::<4>(v)))
                } else {
                    let v = vld1q_u8(row.add(c));
                    (vmovl_u8(vget_low_u8(v)), vmovl_high_u8(v))
                };
                let q = [
                    vcvtq_f32_u32(vmovl_u16(vget_low_u16(a))),
                    vcvtq_f32_u32(vmovl_high_u16(a)),
                    vcvtq_f32_u32(vmovl_u16(vget_low_u16(bq))),
                    vcvtq_f32_u32(vmovl_high_u16(bq)),
                ];
                let wv = [
                    vfmaq_f32(bv, q[0], sv),
                    vfmaq_f32(bv, q[1], sv),
                    vfmaq_f32(bv, q[2], sv),
                    vfmaq_f32(bv, q[3], sv),
                ];
                for j in 0..M {
                    let xj = x.add(j * cols + c);
                    acc0[j] = vfmaq_f32(acc0[j], wv[0], vld1q_f32(xj));
                    acc1[j] = vfmaq_f32(acc1[j], wv[1], vld1q_f32(xj.add(4)));
                    acc0[j] = vfmaq_f32(acc0[j], wv[2], vld1q_f32(xj.add(8)));
                    acc1[j] = vfmaq_f32(acc1[j], wv[3], vld1q_f32(xj.add(12)));
                }
            }
        }
        for j in 0..M {
            out[j][i] = vaddvq_f32(vaddq_f32(acc0[j], acc1[j]));
        }
    }
}
