//! kvserve's conversion of GGUF block types to MLX affine quantization,
//! against the `gguf` Python package's reference dequantization
//! (tests/reference/gguf_blocks.py: random blocks of every type). Per type:
//! kvserve's own dequantization equals gguf's; the MLX affine triples,
//! dequantized by MLX itself, equal gguf's values exactly for the types that
//! map exactly, and within half a step of 8-bit requantization for Q2_K,
//! Q3_K and Q6_K. Prints the error table.

mod common;

use kvserve::model::gguf_quants::{self, Mapping};
use mlx_rs::Array;
use serde_json::Value;

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn every_type_matches_the_gguf_package() {
    let path = common::fixtures().join("gguf-blocks.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let types = v.as_object().unwrap();
    assert_eq!(types.len(), 11, "every quantized type kvserve loads has random blocks");
    eprintln!("| GGUF type | MLX form | max abs error vs gguf.dequantize | max error / value range |");
    eprintln!("|---|---|---|---|");
    for (name, t) in types {
        let ty = t["type"].as_u64().unwrap() as u32;
        let (rows, cols) = (t["rows"].as_u64().unwrap() as usize, t["cols"].as_u64().unwrap() as usize);
        let raw = unhex(t["raw"].as_str().unwrap());
        let truth: Vec<f32> = t["values"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let scale = truth.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.0, "{name}: all zero");

        // kvserve's dequantization is ggml's arithmetic (float32, ulp-level order differences).
        let mine = gguf_quants::dequantize(ty, &raw, rows * cols);
        let d = mine.iter().zip(&truth).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d <= scale * 1e-6, "{name}: kvserve's dequantization differs from gguf's by {d} (values up to {scale})");

        // The MLX form, dequantized by MLX.
        let a = gguf_quants::to_affine(ty, &raw, rows, cols);
        let q = kvserve::mlx::QuantizedMatrix {
            packed: Array::from_slice(&a.packed, &[rows as i32, (cols as i32) * a.bits / 32]),
            scales: Array::from_slice(&a.scales, &[rows as i32, (cols / 32) as i32]),
            biases: Array::from_slice(&a.biases, &[rows as i32, (cols / 32) as i32]),
            group_size: 32,
            bits: a.bits,
        };
        let back = q.dequantize().unwrap();
        back.eval().unwrap();
        let back = back.as_slice::<f32>();
        let err = back.iter().zip(&truth).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let range = truth.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x)) - truth.iter().fold(f32::INFINITY, |m, x| m.min(*x));
        let form = match gguf_quants::mapping(ty).unwrap() {
            Mapping::Exact { bits } => {
                // Exact up to float32 rounding of code * scale + bias.
                assert!(err <= scale * 2e-7, "{name}: MLX's values differ from gguf's by {err} (values up to {scale})");
                assert_eq!(a.max_error, 0.0);
                format!("{bits}-bit, exact")
            }
            Mapping::Requantized => {
                assert_eq!(a.bits, 8);
                // Half a step of each group's 8-bit grid, plus float rounding.
                let worst_step = a.scales.iter().fold(0f32, |m, s| m.max(*s));
                assert!(err <= worst_step * 0.5 + scale * 1e-6, "{name}: requantization error {err} over half a step ({worst_step})");
                assert!(err > 0.0, "{name}: random 16-value sub-blocks cannot share a 32-value group exactly");
                assert!((a.max_error - err).abs() <= scale * 1e-5, "{name}: reported error {} vs measured {err}", a.max_error);
                "8-bit, requantized".to_string()
            }
        };
        eprintln!("| {name} | {form} | {err:.2e} | {:.2e} |", err / range);
    }
}
