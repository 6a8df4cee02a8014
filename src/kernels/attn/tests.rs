use half::f16;

use super::*;

/// A small deterministic generator (xorshift), values in [-2, 2); the
/// prompt-chunk kernel's tests use it too.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
    }
}

fn bits(x: &[f32]) -> Vec<u16> {
    x.iter().map(|&v| f16::from_f32(v).to_bits()).collect()
}

/// Plain f64 attention over the f16 values: `[heads, d]`.
fn reference(q: &[f32], heads: usize, kvh: usize, d: usize, k: &[Vec<f32>], v: &[Vec<f32>], scale: f32) -> Vec<f32> {
    // k[h] / v[h]: token-major [t + 1, d] already rounded through f16.
    let g = heads / kvh;
    let mut out = vec![0f32; heads * d];
    for qh in 0..heads {
        let h = qh / g;
        let t = k[h].len() / d;
        let s: Vec<f64> = (0..t)
            .map(|j| (0..d).map(|c| q[qh * d + c] as f64 * k[h][j * d + c] as f64).sum::<f64>() * scale as f64)
            .collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for c in 0..d {
            out[qh * d + c] = ((0..t).map(|j| e[j] * v[h][j * d + c] as f64).sum::<f64>() / z) as f32;
        }
    }
    out
}

struct Case {
    heads: usize,
    kvh: usize,
    d: usize,
    t: usize,
    capacity: usize,
}

fn run_case(c: &Case, seed: u64) {
    let mut rng = Rng(seed);
    let (heads, kvh, d, t, cap) = (c.heads, c.kvh, c.d, c.t, c.capacity);
    let round = |x: f32| f16::from_f32(x).to_f32();
    let q: Vec<f32> = (0..heads * d).map(|_| rng.next()).collect();
    // Buffers with garbage past `t` (it must never be read).
    let kb: Vec<f32> = (0..kvh * cap * d).map(|_| rng.next()).collect();
    let vb: Vec<f32> = (0..kvh * cap * d).map(|_| rng.next()).collect();
    let nk: Vec<f32> = (0..kvh * d).map(|_| round(rng.next())).collect();
    let nv: Vec<f32> = (0..kvh * d).map(|_| round(rng.next())).collect();
    let (kbits, vbits) = (bits(&kb), bits(&vb));
    let per_head = |buf: &[f32], new: &[f32], h: usize| -> Vec<f32> {
        let mut r: Vec<f32> = buf[h * cap * d..(h * cap + t) * d].iter().map(|&x| round(x)).collect();
        r.extend_from_slice(&new[h * d..(h + 1) * d]);
        r
    };
    let kr: Vec<Vec<f32>> = (0..kvh).map(|h| per_head(&kb, &nk, h)).collect();
    let vr: Vec<Vec<f32>> = (0..kvh).map(|h| per_head(&vb, &nv, h)).collect();
    let scale = (d as f32).powf(-0.5);
    let want = reference(&q, heads, kvh, d, &kr, &vr, scale);
    let keys = KvBuffer { data: &kbits, heads: kvh, capacity: cap, len: t, dim: d };
    let values = KvBuffer { data: &vbits, ..keys };
    let (nkb, nvb) = (bits(&nk), bits(&nv));
    let mut fast = vec![0f32; heads * d];
    let mut slow = vec![0f32; heads * d];
    decode_attention(&q, heads, &keys, &values, &nkb, &nvb, scale, &mut fast).unwrap();
    decode_attention_with(SCALAR, &q, heads, &keys, &values, &nkb, &nvb, scale, &mut slow).unwrap();
    for (name, got) in [("dispatched", &fast), ("scalar", &slow)] {
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 2e-5, "{name}: heads {heads}/{kvh}, d {d}, t {t}: worst difference {worst}");
    }
}

#[test]
fn matches_an_f64_reference_over_shapes() {
    let cases = [
        Case { heads: 9, kvh: 3, d: 64, t: 0, capacity: 256 },
        Case { heads: 9, kvh: 3, d: 64, t: 1, capacity: 256 },
        Case { heads: 9, kvh: 3, d: 64, t: 255, capacity: 256 },
        Case { heads: 4, kvh: 4, d: 8, t: 37, capacity: 40 },
        Case { heads: 8, kvh: 2, d: 128, t: 700, capacity: 768 },
        Case { heads: 6, kvh: 1, d: 24, t: 513, capacity: 600 },
        Case { heads: 2, kvh: 1, d: 10, t: 5, capacity: 5 },
        Case { heads: 16, kvh: 2, d: 64, t: 2 * BLOCK + 3, capacity: 2 * BLOCK + 64 },
    ];
    for (i, c) in cases.iter().enumerate() {
        run_case(c, 0x9e37_79b9 + i as u64);
    }
}

#[test]
fn long_caches_split_into_blocks_agree_with_one_pass() {
    // 12K tokens: many blocks across the pool, merged.
    run_case(&Case { heads: 9, kvh: 3, d: 64, t: 12_000, capacity: 12_032 }, 42);
}

#[test]
fn bad_shapes_are_errors() {
    let data = vec![0u16; 2 * 4 * 8];
    let keys = KvBuffer { data: &data, heads: 2, capacity: 4, len: 4, dim: 8 };
    let q = vec![0f32; 3 * 8];
    let mut out = vec![0f32; 3 * 8];
    let new = vec![0u16; 16];
    // 3 query heads over 2 KV heads.
    assert!(decode_attention(&q, 3, &keys, &keys, &new, &new, 1.0, &mut out).is_err());
    let long = KvBuffer { len: 5, ..keys };
    let q = vec![0f32; 4 * 8];
    let mut out = vec![0f32; 4 * 8];
    assert!(decode_attention(&q, 4, &long, &long, &new, &new, 1.0, &mut out).is_err());
    let short = KvBuffer { data: &data[1..], ..keys };
    assert!(decode_attention(&q, 4, &short, &short, &new, &new, 1.0, &mut out).is_err());
    assert!(decode_attention(&q, 4, &keys, &keys, &new, &new, 1.0, &mut out).is_ok());
}
