//! Whole GGUF models in every type kvserve converts, end to end (file ->
//! conversion -> model -> logits), against the `gguf` package's reference
//! dequantization of the same file. `make fixtures` writes, from the real
//! SmolLM2 GGUF (tests/reference/gguf_twin.py):
//! - `mixed.gguf`: its 2-D weights replaced by random blocks of Q4_K, Q6_K,
//!   Q5_K, Q3_K, Q2_K (the rows of 1536), IQ4_NL, Q5_0 and Q5_1 in turn,
//!   with small scales; norms and everything else as in the file;
//! - `mixed-f32.gguf`: the same model with every tensor dequantized by the
//!   gguf package to F32.
//! kvserve loads both; their logits must agree (the exact types exactly, up
//! to summation order; the requantized Q2_K/Q3_K/Q6_K within their 8-bit
//! error), and so must their greedy tokens.

mod common;

use kvserve::cache::kv::new_cache;
use kvserve::model::{self, gguf, Transformer};
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::Array;

fn load(name: &str) -> Transformer {
    let path = common::fixtures().join("gguf").join(name);
    let c = gguf::convert(&path, None).unwrap_or_else(|e| panic!("{name}: {e}"));
    let cfg = gguf::parse_config(&c, &path).unwrap();
    model::build(&cfg, c.weights).unwrap()
}

fn run(m: &Transformer, prompt: &[i32], steps: usize) -> (Vec<f32>, Vec<i32>) {
    let mut cache = new_cache(m.num_layers());
    let logits = m.forward(&Array::from_slice(prompt, &[1, prompt.len() as i32]), &mut cache, true).unwrap();
    let last = logits.index((0, -1, ..));
    last.eval().unwrap();
    let first = last.as_slice::<f32>().to_vec();
    let argmax = |v: &[f32]| v.iter().enumerate().fold(0, |b, (j, &x)| if x > v[b] { j } else { b }) as i32;
    let mut tokens = vec![argmax(&first)];
    for _ in 1..steps {
        let l = m.forward(&Array::from_slice(&[*tokens.last().unwrap()], &[1, 1]), &mut cache, true).unwrap().index((0, -1, ..));
        l.eval().unwrap();
        tokens.push(argmax(l.as_slice::<f32>()));
    }
    (first, tokens)
}

#[test]
fn every_converted_type_equals_the_gguf_package_on_a_whole_model() {
    let quantized = load("mixed.gguf");
    let reference = load("mixed-f32.gguf");
    let prompt: Vec<i32> = (0..40).map(|i| 1 + (i * 7919) % 49000).collect();
    let (a, ta) = run(&quantized, &prompt, 12);
    let (b, tb) = run(&reference, &prompt, 12);
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let spread = b.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x)) - b.iter().fold(f32::INFINITY, |m, x| m.min(*x));
    eprintln!("mixed GGUF types vs the gguf package's F32: max logit difference {diff:.3e} (logits span {spread:.3}); greedy {ta:?} vs {tb:?}");
    assert!(spread > 1.0, "the random model's logits are flat ({spread}): the check would prove nothing");
    // measured 3.8e-4 on a span of 70.8 here (5e-6 of it)
    assert!(diff < 1e-4 * spread, "logits differ by {diff} (span {spread})");
    assert_eq!(ta, tb, "greedy tokens");
}

/// `kvserve convert` writes the mixed-type model as an MLX folder; mlx-lm
/// 0.32.2 loads that folder and its logits match kvserve's on it (both with
/// f16 keys and values).
#[test]
fn the_converted_folder_loads_in_mlx_lm_with_the_same_logits() {
    let src = common::fixtures().join("gguf").join("mixed.gguf");
    let dir = std::env::temp_dir().join(format!("kvserve-gguf-convert-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let c = gguf::convert(&src, None).unwrap();
    gguf::write_dir(&c, &dir).unwrap();
    let cfg = model::load_config(&dir).unwrap();
    let m = model::build(&cfg, model::load_safetensors_dir(&dir).unwrap()).unwrap();
    let prompt: Vec<i32> = (0..24).map(|i| 3 + (i * 104729) % 49000).collect();
    let (ours, _) = run(&m, &prompt, 1);
    let ids = prompt.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let out = dir.join("mlx_lm_logits.json");
    common::run_reference_script("mlx_lm_logits.py", &[dir.display().to_string(), ids, out.display().to_string()], "done: mlx-lm logits");
    let theirs: Vec<f32> = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let diff = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let spread = theirs.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x)) - theirs.iter().fold(f32::INFINITY, |m, x| m.min(*x));
    eprintln!("kvserve vs mlx-lm on the converted folder: max logit difference {diff:.3e} (span {spread:.3})");
    assert_eq!(ours.len(), theirs.len());
    assert!(spread > 1.0 && diff < 1e-4 * spread, "logits differ by {diff} (span {spread})");
    let _ = std::fs::remove_dir_all(&dir);
}
