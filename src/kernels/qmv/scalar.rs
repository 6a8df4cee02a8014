//! The readable reference: dequantize each weight, multiply, add, in f32.

use super::{Job, QuantMatrix};

/// The quantized value at row `r`, column `c` (bit order as MLX packs it:
/// value `k` of a word sits at bits `k * bits ..`).
#[inline]
pub(crate) fn q_at(w: &QuantMatrix, r: usize, c: usize) -> u32 {
    let per_word = (32 / w.bits) as usize;
    let words_per_row = w.cols / per_word;
    let word = w.packed[r * words_per_row + c / per_word];
    (word >> ((c % per_word) as u32 * w.bits)) & ((1 << w.bits) - 1)
}

/// See [`super::RowsFn`]; x is in natural order.
pub(crate) fn rows(job: &Job, r0: usize, out: &mut [&mut [f32]]) {
    let w = job.w;
    let (cols, g) = (w.cols, w.group_size);
    let groups = cols / g;
    for i in 0..out[0].len() {
        let r = r0 + i;
        for (j, yj) in out.iter_mut().enumerate() {
            let x = &job.x[j * cols..(j + 1) * cols];
            let mut acc = 0.0f32;
            for (c, &xc) in x.iter().enumerate() {
                let s = w.scales.get(r * groups + c / g);
                let b = w.biases.get(r * groups + c / g);
                acc += xc * (q_at(w, r, c) as f32 * s + b);
            }
            yj[i] = acc;
        }
    }
}

/// Rows `r0 .. r0 + out.len() / cols` of the dense matrix, in natural order.
pub(crate) fn dequant_rows(w: &QuantMatrix, r0: usize, out: &mut [f32]) {
    let (cols, g) = (w.cols, w.group_size);
    let groups = cols / g;
    for (i, row) in out.chunks_exact_mut(cols).enumerate() {
        let r = r0 + i;
        for (c, o) in row.iter_mut().enumerate() {
            *o = q_at(w, r, c) as f32 * w.scales.get(r * groups + c / g) + w.biases.get(r * groups + c / g);
        }
    }
}
