//! GGUF tensor data that kvserve converts itself, to MLX's affine
//! quantization (`value = code * scale + bias`, groups of 32 along a row,
//! codes packed little-endian into 32-bit words).
//!
//! Most block types map exactly onto affine groups of 32:
//! - Q4_0, Q4_1, Q4_K: 4-bit codes (Q4_K: each 32-value sub-block has its
//!   own 6-bit scale and minimum, which become the group's scale and bias);
//! - Q5_0, Q5_1, Q5_K, Q8_0: their 5- or 8-bit codes as 8-bit codes;
//! - IQ4_NL: a 16-entry table of integers -127..113 times the block scale,
//!   so the entry plus 127 is an exact 8-bit code.
//!
//! Q2_K, Q3_K and Q6_K scale sub-blocks of 16 values separately; MLX's
//! groups are 32 or larger, so two sub-blocks share a group. Their values
//! are requantized to 8 bits over each group's range: the error is at most
//! half of range/255 (1/510 of the group's range), finer than the coarser
//! sub-block's own step but not always than the finer one's.
//!
//! Formats as ggml defines them (ggml-common.h, ggml-quants.c); checked
//! against the `gguf` Python package's `dequantize` in tests/gguf_quants.rs.

use half::{bf16, f16};

pub const F32: u32 = 0;
pub const F16: u32 = 1;
pub const Q4_0: u32 = 2;
pub const Q4_1: u32 = 3;
pub const Q5_0: u32 = 6;
pub const Q5_1: u32 = 7;
pub const Q8_0: u32 = 8;
pub const Q2_K: u32 = 10;
pub const Q3_K: u32 = 11;
pub const Q4_K: u32 = 12;
pub const Q5_K: u32 = 13;
pub const Q6_K: u32 = 14;
pub const IQ4_NL: u32 = 20;
pub const BF16: u32 = 30;

/// Every tensor type kvserve loads, in ggml's order (for messages).
pub const LOADED: [u32; 14] = [F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, BF16];

/// The types MLX's own GGUF loader converts exactly; a file with any other
/// type is read by kvserve ([`dense`], [`to_affine`]).
pub const MLX_NATIVE: [u32; 6] = [F32, F16, BF16, Q4_0, Q4_1, Q8_0];

/// (values per block, bytes per block).
pub fn block_layout(t: u32) -> Option<(usize, usize)> {
    Some(match t {
        F32 => (1, 4),
        F16 | BF16 => (1, 2),
        Q4_0 => (32, 18),
        Q4_1 => (32, 20),
        Q5_0 => (32, 22),
        Q5_1 => (32, 24),
        Q8_0 => (32, 34),
        IQ4_NL => (32, 18),
        Q2_K => (256, 84),
        Q3_K => (256, 110),
        Q4_K => (256, 144),
        Q5_K => (256, 176),
        Q6_K => (256, 210),
        _ => return None,
    })
}

/// How a quantized type becomes MLX affine groups of 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Codes, scales and biases carried over unchanged, in `bits` bits.
    Exact { bits: i32 },
    /// Dequantized and requantized to 8 bits per group of 32.
    Requantized,
}

pub fn mapping(t: u32) -> Option<Mapping> {
    match t {
        Q4_0 | Q4_1 | Q4_K => Some(Mapping::Exact { bits: 4 }),
        Q5_0 | Q5_1 | Q5_K | Q8_0 | IQ4_NL => Some(Mapping::Exact { bits: 8 }),
        Q2_K | Q3_K | Q6_K => Some(Mapping::Requantized),
        _ => None,
    }
}

fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// IQ4_NL's 16 levels (ggml's kvalues_iq4nl).
const IQ4NL_LEVELS: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// Q4_K/Q5_K: the 6-bit scale and minimum of sub-block `j` (0..8).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q3_K: its twelve scale bytes as sixteen 6-bit scales (before the -32).
fn scales_q3k(b: &[u8]) -> [i8; 16] {
    let mut aux = [0u32; 4];
    for (i, a) in aux.iter_mut().take(3).enumerate() {
        *a = u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
    }
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4);
    aux[3] = ((aux[1] >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4);
    aux[0] = (aux[0] & KMASK2) | ((tmp & KMASK1) << 4);
    aux[1] = (aux[1] & KMASK2) | (((tmp >> 2) & KMASK1) << 4);
    let mut out = [0i8; 16];
    for (i, a) in aux.iter().enumerate() {
        for (k, byte) in a.to_le_bytes().iter().enumerate() {
            out[4 * i + k] = *byte as i8;
        }
    }
    out
}

/// Calls `f(scale, bias, codes)` for each affine group of one block, in
/// value order: groups of 32 for every type but Q2_K, Q3_K and Q6_K, whose
/// groups are 16 values. `value = code * scale + bias` is ggml's value.
fn block_groups(t: u32, b: &[u8], f: &mut impl FnMut(f32, f32, &[u8])) {
    let mut c = [0u8; 32];
    match t {
        Q4_0 | Q4_1 | IQ4_NL => {
            let (d, qs) = (h(b, 0), if t == Q4_1 { &b[4..20] } else { &b[2..18] });
            for j in 0..16 {
                c[j] = qs[j] & 0xF;
                c[j + 16] = qs[j] >> 4;
            }
            match t {
                Q4_0 => f(d, -8.0 * d, &c),
                Q4_1 => f(d, h(b, 2), &c),
                _ => {
                    for x in c.iter_mut() {
                        *x = (IQ4NL_LEVELS[*x as usize] as i16 + 127) as u8;
                    }
                    f(d, -127.0 * d, &c)
                }
            }
        }
        Q5_0 | Q5_1 => {
            let (d, at) = (h(b, 0), if t == Q5_1 { 4 } else { 2 });
            let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            let qs = &b[at + 4..at + 20];
            for j in 0..16 {
                c[j] = (qs[j] & 0xF) | ((((qh >> j) & 1) as u8) << 4);
                c[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            }
            if t == Q5_0 {
                f(d, -16.0 * d, &c)
            } else {
                f(d, h(b, 2), &c)
            }
        }
        Q8_0 => {
            let d = h(b, 0);
            for j in 0..32 {
                c[j] = (b[2 + j] as i8 as i16 + 128) as u8;
            }
            f(d, -128.0 * d, &c)
        }
        Q4_K | Q5_K => {
            let (d, dmin, sc) = (h(b, 0), h(b, 2), &b[4..16]);
            let (qh, ql) = if t == Q5_K { (&b[16..48], &b[48..176]) } else { (&b[0..0], &b[16..144]) };
            for j in 0..4 {
                let q = &ql[32 * j..32 * j + 32];
                for half in 0..2 {
                    let (s, m) = scale_min_k4(2 * j + half, sc);
                    let bit = 1u8 << (2 * j + half);
                    for l in 0..32 {
                        let low = if half == 0 { q[l] & 0xF } else { q[l] >> 4 };
                        let high = if t == Q5_K && qh[l] & bit != 0 { 16 } else { 0 };
                        c[l] = low + high;
                    }
                    f(d * s as f32, -(dmin * m as f32), &c);
                }
            }
        }
        Q2_K => {
            let (scales, qs, d, dmin) = (&b[0..16], &b[16..80], h(b, 80), h(b, 82));
            let mut is = 0;
            for n in 0..2 {
                let q = &qs[32 * n..32 * n + 32];
                for j in 0..4 {
                    for half in 0..2 {
                        let s = scales[is];
                        is += 1;
                        for l in 0..16 {
                            c[l] = (q[l + 16 * half] >> (2 * j)) & 3;
                        }
                        f(d * (s & 0xF) as f32, -(dmin * (s >> 4) as f32), &c[..16]);
                    }
                }
            }
        }
        Q3_K => {
            let (hm, qs, d) = (&b[0..32], &b[32..96], h(b, 108));
            let scales = scales_q3k(&b[96..108]);
            let mut is = 0;
            let mut m = 1u8;
            for n in 0..2 {
                let q = &qs[32 * n..32 * n + 32];
                for j in 0..4 {
                    for half in 0..2 {
                        let dl = d * (scales[is] as i32 - 32) as f32;
                        is += 1;
                        for l in 0..16 {
                            let k = l + 16 * half;
                            c[l] = ((q[k] >> (2 * j)) & 3) | if hm[k] & m != 0 { 4 } else { 0 };
                        }
                        f(dl, -4.0 * dl, &c[..16]);
                    }
                    m = m.wrapping_shl(1);
                }
            }
        }
        Q6_K => {
            let (ql, qh, sc, d) = (&b[0..128], &b[128..192], &b[192..208], h(b, 208));
            for n in 0..2 {
                let (ql, qh, sc) = (&ql[64 * n..64 * n + 64], &qh[32 * n..32 * n + 32], &sc[8 * n..8 * n + 8]);
                for k in 0..8 {
                    let kind = k / 2;
                    for i in 0..16 {
                        let l = 16 * (k % 2) + i;
                        let low = match kind {
                            0 => ql[l] & 0xF,
                            1 => ql[l + 32] & 0xF,
                            2 => ql[l] >> 4,
                            _ => ql[l + 32] >> 4,
                        };
                        c[i] = low | (((qh[l] >> (2 * kind)) & 3) << 4);
                    }
                    let s = d * sc[k] as i8 as f32;
                    f(s, -32.0 * s, &c[..16]);
                }
            }
        }
        _ => unreachable!("block_groups of type {t}"),
    }
}

/// ggml's values of `n` values of type `t` starting at `data` (whole
/// blocks), or of a dense type.
pub fn dequantize(t: u32, data: &[u8], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    match t {
        F32 => out.extend(data[..4 * n].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        F16 => out.extend(data[..2 * n].chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())),
        BF16 => out.extend(data[..2 * n].chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())),
        _ => {
            let (per, bytes) = block_layout(t).expect("a loaded type");
            for b in data[..n / per * bytes].chunks_exact(bytes) {
                block_groups(t, b, &mut |s, bias, c| out.extend(c.iter().map(|&q| q as f32 * s + bias)));
            }
        }
    }
    out
}

/// A 2-D tensor in MLX's affine layout: `packed` is `[rows, cols * bits / 32]`
/// words, `scales` and `biases` `[rows, cols / 32]`.
#[derive(Debug, Clone)]
pub struct Affine {
    pub bits: i32,
    pub packed: Vec<u32>,
    pub scales: Vec<f32>,
    pub biases: Vec<f32>,
    /// The largest |converted - ggml's value|; 0 when exact.
    pub max_error: f32,
    /// The largest error of a group over that group's range (max - min of
    /// its values): at most 1/510 for 8-bit requantization; 0 when exact.
    pub max_rel_error: f32,
}

fn pack(codes: &[u8], bits: i32, out: &mut Vec<u32>) {
    let per = (32 / bits) as usize;
    for w in codes.chunks_exact(per) {
        out.push(w.iter().enumerate().fold(0u32, |acc, (j, &q)| acc | (q as u32) << (bits as usize * j)));
    }
}

/// Convert `rows` rows of `cols` values of quantized type `t` (whole blocks,
/// row after row) to MLX's affine layout with groups of 32.
pub fn to_affine(t: u32, data: &[u8], rows: usize, cols: usize) -> Affine {
    let map = mapping(t).expect("a quantized type");
    let (per, bytes) = block_layout(t).expect("a quantized type");
    let bits = match map {
        Mapping::Exact { bits } => bits,
        Mapping::Requantized => 8,
    };
    let groups = rows * cols / 32;
    let mut a = Affine {
        bits,
        packed: Vec::with_capacity(groups * bits as usize),
        scales: Vec::with_capacity(groups),
        biases: Vec::with_capacity(groups),
        max_error: 0.0,
        max_rel_error: 0.0,
    };
    let blocks = rows * cols / per;
    match map {
        Mapping::Exact { .. } => {
            for b in data[..blocks * bytes].chunks_exact(bytes) {
                block_groups(t, b, &mut |s, bias, c| {
                    a.scales.push(s);
                    a.biases.push(bias);
                    pack(c, bits, &mut a.packed);
                });
            }
        }
        Mapping::Requantized => {
            let mut values = [0f32; 32];
            let mut filled = 0;
            let mut codes = [0u8; 32];
            for b in data[..blocks * bytes].chunks_exact(bytes) {
                block_groups(t, b, &mut |s, bias, c| {
                    for &q in c {
                        values[filled] = q as f32 * s + bias;
                        filled += 1;
                    }
                    if filled < 32 {
                        return;
                    }
                    filled = 0;
                    let lo = values.iter().copied().fold(f32::INFINITY, f32::min);
                    let hi = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
                    let mut group_error = 0f32;
                    for (q, v) in codes.iter_mut().zip(&values) {
                        *q = ((v - lo) / scale).round().clamp(0.0, 255.0) as u8;
                        group_error = group_error.max((*q as f32 * scale + lo - v).abs());
                    }
                    a.max_error = a.max_error.max(group_error);
                    if hi > lo {
                        a.max_rel_error = a.max_rel_error.max(group_error / (hi - lo));
                    }
                    a.scales.push(scale);
                    a.biases.push(lo);
                    pack(&codes, 8, &mut a.packed);
                });
            }
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_0_block_is_exact_and_packed_as_mlx_does() {
        // d = 0.5, nibbles 0..15 then 15..0.
        let mut b = vec![0u8; 18];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        for j in 0..16 {
            b[2 + j] = (j as u8) | ((15 - j as u8) << 4);
        }
        let v = dequantize(Q4_0, &b, 32);
        assert_eq!(v[0], -4.0); // (0 - 8) * 0.5
        assert_eq!(v[15], 3.5);
        assert_eq!(v[16], 3.5); // (15 - 8) * 0.5
        let a = to_affine(Q4_0, &b, 1, 32);
        assert_eq!((a.bits, a.scales[0], a.biases[0]), (4, 0.5, -4.0));
        // Value j sits in bits 4*(j%8) of word j/8.
        assert_eq!(a.packed[0], 0x7654_3210);
        assert_eq!(a.packed[2], 0x89ab_cdef);
        assert_eq!(a.max_error, 0.0);
    }

    #[test]
    fn iq4_nl_levels_become_exact_8_bit_codes() {
        let mut b = vec![0u8; 18];
        b[..2].copy_from_slice(&f16::from_f32(2.0).to_le_bytes());
        b[2] = 0xF0; // value 0: level 0 (-127), value 16: level 15 (113)
        let v = dequantize(IQ4_NL, &b, 32);
        assert_eq!((v[0], v[16]), (-254.0, 226.0));
        let a = to_affine(IQ4_NL, &b, 1, 32);
        assert_eq!(a.bits, 8);
        assert_eq!(a.packed[0] & 0xFF, 0); // -127 + 127
        assert_eq!(a.packed[4] & 0xFF, 240); // 113 + 127
    }

    #[test]
    fn requantized_types_stay_within_half_a_step() {
        // A Q6_K block of pseudo-random bytes with a sane scale.
        let mut b: Vec<u8> = (0..210u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        b[208..210].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
        let truth = dequantize(Q6_K, &b, 256);
        let a = to_affine(Q6_K, &b, 1, 256);
        assert_eq!((a.bits, a.scales.len(), a.packed.len()), (8, 8, 64));
        for (g, chunk) in truth.chunks(32).enumerate() {
            for (i, v) in chunk.iter().enumerate() {
                let code = (a.packed[8 * g + i / 4] >> (8 * (i % 4))) & 0xFF;
                let back = code as f32 * a.scales[g] + a.biases[g];
                assert!((back - v).abs() <= a.scales[g] * 0.5 + 1e-6, "group {g} value {i}: {back} vs {v}");
            }
        }
        assert!(a.max_error > 0.0 && a.max_rel_error > 0.0 && a.max_rel_error <= 0.5 / 255.0 + 1e-6, "{a:?}");
    }
}
