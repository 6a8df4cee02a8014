//! Parity with mlx-lm 0.32.2: tiny random models of every architecture, built
//! and quantized by mlx-lm's own classes (tests/reference/make_tiny.py), give
//! the same last-position logits and the same 32 greedy tokens here. The
//! reference runs mlx-lm's models with mlx-lm's KV cache holding f16 keys
//! and values, as kvserve's does; against f32 keys and values the logits
//! move by at most [`F16_KV_TOL`].

mod common;

use kvserve::cache::kv::new_cache;
use kvserve::model::{self, Transformer};
use mlx_rs::ops::indexing::{argmax_axis, IndexOp};
use mlx_rs::Array;
use serde_json::Value;

const MODELS: &[&str] = &["llama_q4", "llama3_q8_untied", "llama_f32", "qwen2_q4", "qwen3_q4", "qwen3_moe_q4", "glm4_moe_q4", "gpt_oss_q4", "qwen3_5_q4", "qwen3_5_moe_q4"];
/// fp32 everywhere; differences come from summation order only.
const LOGIT_TOL: f32 = 2e-3;
/// The CPU's dense prefill (dequantize + BLAS) sums in another order than
/// mlx-lm's quantized kernel; a last-bit difference in a key can round it to
/// the neighbouring f16 value, so this path gets twice the margin (measured
/// up to 1.98e-3 on this machine; other CPUs' BLAS may sum differently).
const DENSE_LOGIT_TOL: f32 = 4e-3;
/// What storing keys and values in f16 may change in these models' logits
/// (they are scaled up for decisive greedy choices; measured up to 1.6e-2).
const F16_KV_TOL: f32 = 3e-2;

struct Reference {
    prompt: Vec<i32>,
    last_logits: Vec<f32>,
    last_logits_f32_kv: Vec<f32>,
    greedy: Vec<i32>,
}

fn reference(name: &str) -> Reference {
    let path = common::fixtures().join("tiny").join(name).join("reference.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let ints = |k: &str| v[k].as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect();
    Reference {
        prompt: ints("prompt"),
        last_logits: v["last_logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect(),
        last_logits_f32_kv: v["last_logits_f32_kv"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect(),
        greedy: ints("greedy"),
    }
}

fn load(name: &str, dense_prefill: bool) -> Transformer {
    let dir = common::fixtures().join("tiny").join(name);
    let cfg = model::load_config(&dir).unwrap();
    model::build_with(&cfg, model::load_safetensors_dir(&dir).unwrap(), dense_prefill).unwrap()
}

fn tokens(ids: &[i32]) -> Array {
    Array::from_slice(ids, &[1, ids.len() as i32])
}

fn last_logits(m: &Transformer, prompt: &[i32]) -> Vec<f32> {
    let mut cache = new_cache(m.num_layers());
    let logits = m.forward(&tokens(prompt), &mut cache, false).unwrap();
    let l = logits.shape()[1];
    let last = logits.index((0, l - 1, ..));
    last.eval().unwrap();
    last.as_slice::<f32>().to_vec()
}

fn greedy(m: &Transformer, prompt: &[i32], n: usize) -> Vec<i32> {
    let mut cache = new_cache(m.num_layers());
    let mut logits = m.forward(&tokens(prompt), &mut cache, true).unwrap();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let next = argmax_axis(logits.index((0, -1, ..)), -1, None).unwrap();
        next.eval().unwrap();
        let id = next.item_exact::<u32>() as i32;
        out.push(id);
        logits = m.forward(&tokens(&[id]), &mut cache, true).unwrap();
    }
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn check(name: &str, dense_prefill: bool) {
    let r = reference(name);
    let m = load(name, dense_prefill);
    let logits = last_logits(&m, &r.prompt);
    let d = max_diff(&logits, &r.last_logits);
    let f32_kv = max_diff(&logits, &r.last_logits_f32_kv);
    eprintln!("{name} dense_prefill={dense_prefill}: max logit difference {d:.2e} (against f32 keys and values: {f32_kv:.2e})");
    let tol = if dense_prefill { DENSE_LOGIT_TOL } else { LOGIT_TOL };
    assert!(d < tol, "{name} (dense_prefill={dense_prefill}): max logit difference {d}");
    // What f16 storage does to the reference itself, a check of the fixtures
    // as calibrated on the CPU. On a GPU, MLX's f32 matrix products round
    // otherwise and this measured 0.35 for qwen3_q4 (H100, mlx-cuda-13),
    // while kvserve matched the f16 reference exactly: reported, not asserted.
    if model::on_cpu() {
        assert!(f32_kv < F16_KV_TOL, "{name} (dense_prefill={dense_prefill}): f16 keys and values move the logits by {f32_kv}");
    }
    assert_eq!(greedy(&m, &r.prompt, r.greedy.len()), r.greedy, "{name} (dense_prefill={dense_prefill}) greedy tokens");
}

/// Run `f` for every model; the test fails after all ran, naming each
/// model that failed (so one run, e.g. on a lent GPU, shows them all).
fn for_every_model(f: impl Fn(&str)) {
    let failed: Vec<String> = MODELS
        .iter()
        .filter_map(|name| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(name))).err().map(|e| {
                let why = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                format!("{name}: {why}")
            })
        })
        .collect();
    assert!(failed.is_empty(), "{} of {} models failed:\n{}", failed.len(), MODELS.len(), failed.join("\n"));
}

#[test]
fn every_architecture_matches_mlx_lm() {
    for_every_model(|name| check(name, false));
}

#[test]
fn cpu_dense_prefill_path_matches_mlx_lm() {
    if !model::on_cpu() {
        // build() never picks dense prefill off the CPU (it is kvserve's CPU
        // fast path: dequantize + BLAS); on an H100 its f32 products of
        // dequantized weights moved qwen3_q4's logits by 7.0.
        eprintln!("dense prefill is the CPU's path and is not used on the GPU: not compared here");
        return;
    }
    for_every_model(|name| check(name, true));
}

#[test]
fn prefill_split_equals_prefill_at_once() {
    let r = reference("qwen3_q4");
    // the path build() takes on this device: dense prefill on the CPU, MLX's quantized kernels on a GPU
    let m = load("qwen3_q4", model::on_cpu());
    let mut cache = new_cache(m.num_layers());
    let (a, b) = r.prompt.split_at(7);
    m.forward(&tokens(a), &mut cache, true).unwrap();
    let logits = m.forward(&tokens(b), &mut cache, true).unwrap().index((0, 0, ..));
    logits.eval().unwrap();
    let d = max_diff(logits.as_slice::<f32>(), &r.last_logits);
    assert!(d < LOGIT_TOL, "split prefill differs by {d}");
}

/// The scheduler's batched decode step (`Transformer::decode_batch`): three
/// sequences of different lengths, each with its own cache, decoded
/// together for several steps give each one the logits it gets decoded
/// alone, on every architecture; through MLX's ops (`dense_prefill` false:
/// the projections batched, attention per row) and on the CPU paths
/// (kvserve's kernels: the same bits). Each step feeds every row its own
/// greedy token, so the rows' positions move apart.
#[test]
fn batched_decode_equals_each_row_alone() {
    for_every_model(|name| {
        let paths: &[bool] = if model::on_cpu() { &[false, true] } else { &[false] };
        for &dense_prefill in paths {
            let r = reference(name);
            let m = load(name, dense_prefill);
            let lens = [3usize, 7, r.prompt.len()];
            let prefilled = |n: usize| {
                let mut c = new_cache(m.num_layers());
                m.forward(&tokens(&r.prompt[..n - 1]), &mut c, true).unwrap();
                c
            };
            let mut batched: Vec<_> = lens.iter().map(|&n| prefilled(n)).collect();
            let mut alone: Vec<_> = lens.iter().map(|&n| prefilled(n)).collect();
            let mut next: Vec<u32> = lens.iter().map(|&n| r.prompt[n - 1] as u32).collect();
            let mut worst = 0f32;
            // On the CPU the batched step gives the same bits. On a GPU, MLX
            // picks another f32 matrix-product kernel for 3 rows than for 1:
            // llama_f32 (unquantized f32 weights) moved by 0.017 on an H100;
            // the greedy tokens must still agree.
            let batch_tol = if model::on_cpu() { 1e-4 } else { 5e-2 };
            for step in 0..4 {
                let logits = {
                    let mut refs: Vec<&mut [kvserve::cache::kv::LayerKv]> = batched.iter_mut().map(|c| c.as_mut_slice()).collect();
                    m.decode_batch(&next, &mut refs).unwrap()
                };
                logits.eval().unwrap();
                let all = logits.as_slice::<f32>().to_vec();
                let vocab = all.len() / lens.len();
                for (i, row) in all.chunks_exact(vocab).enumerate() {
                    let one = m.forward(&tokens(&[next[i] as i32]), &mut alone[i], true).unwrap().index((0, 0, ..));
                    one.eval().unwrap();
                    let d = max_diff(row, one.as_slice::<f32>());
                    worst = worst.max(d);
                    assert!(d < batch_tol, "{name} (dense_prefill={dense_prefill}) step {step} row {i}: logits differ by {d}");
                    let best = |v: &[f32]| v.iter().enumerate().fold(0, |b, (j, &x)| if x > v[b] { j } else { b });
                    assert_eq!(best(row), best(one.as_slice::<f32>()), "{name} step {step} row {i}: greedy token");
                    next[i] = best(row) as u32;
                }
                for (c, a) in batched.iter().zip(&alone) {
                    assert_eq!(c[0].offset(), a[0].offset(), "{name}: each row at its own position");
                }
            }
            eprintln!("{name} dense_prefill={dense_prefill}: batched vs alone, largest logit difference {worst:.1e}");
        }
    });
}
