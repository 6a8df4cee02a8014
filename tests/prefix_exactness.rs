//! Resuming from a KV snapshot gives what computing the whole prompt at once
//! gives: exact snapshots, snapshots of a longer sequence trimmed back, and
//! snapshots written to disk and read back; for every tiny architecture and
//! the real SmolLM2. A snapshot is not changed by writes after it was taken.

mod common;

use std::path::PathBuf;

use kvserve::cache::kv::{new_cache, LayerKv};
use kvserve::cache::store::{self, Store};
use kvserve::engine::generate::prefill;
use kvserve::model::{self, source, Transformer};
use mlx_rs::ops::indexing::{argmax_axis, IndexOp};
use mlx_rs::Array;

const TINY: &[&str] = &["llama_q4", "llama3_q8_untied", "llama_f32", "qwen2_q4", "qwen3_q4", "qwen3_moe_q4", "glm4_moe_q4", "gpt_oss_q4", "qwen3_5_q4", "qwen3_5_moe_q4"];

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kvserve-exact-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn logits_of(l: &Array) -> Vec<f32> {
    l.eval().unwrap();
    l.as_slice::<f32>().to_vec()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Compute `rest` on top of `cache`, then 32 greedy tokens; returns the
/// last-position logits after `rest` and the tokens.
fn resume(m: &Transformer, mut cache: Vec<LayerKv>, rest: &[u32]) -> (Vec<f32>, Vec<u32>) {
    let logits = prefill(m, &mut cache, rest, 64).unwrap();
    let first = logits_of(&logits);
    let mut out = vec![];
    let mut l = logits;
    for _ in 0..32 {
        let y = argmax_axis(&l, -1, None).unwrap();
        y.eval().unwrap();
        let id = y.item_exact::<u32>();
        out.push(id);
        l = m.forward(&Array::from_slice(&[id as i32], &[1, 1]), &mut cache, true).unwrap().index((0, 0, ..));
    }
    (first, out)
}

fn snapshot(cache: &[LayerKv]) -> Vec<LayerKv> {
    cache.iter().map(LayerKv::snapshot).collect()
}

fn check(name: &str, m: &Transformer, prompt: &[u32], other: &[u32], tol: f32) {
    let k = prompt.len() * 2 / 3;
    let (want_logits, want_tokens) = resume(m, new_cache(m.num_layers()), prompt);

    // Exact: a snapshot after k tokens, resumed twice (the first resume's
    // writes must not reach the snapshot).
    let mut c = new_cache(m.num_layers());
    prefill(m, &mut c, &prompt[..k], 48).unwrap();
    let snap = snapshot(&c);
    for round in 0..2 {
        let (l, t) = resume(m, snapshot(&snap), &prompt[k..]);
        let d = max_diff(&l, &want_logits);
        eprintln!("{name} exact (round {round}): max logit difference {d:.2e}");
        assert!(d < tol, "{name}: exact snapshot, round {round}: logits differ by {d}");
        assert_eq!(t, want_tokens, "{name}: exact snapshot, round {round}: greedy tokens");
    }

    // Trimmed: a snapshot of prompt[..k] + other tokens, cut back to k.
    // A recurrent state cannot be: trimming it is refused, never wrong.
    let mut c = new_cache(m.num_layers());
    let longer: Vec<u32> = prompt[..k].iter().chain(other).copied().collect();
    prefill(m, &mut c, &longer, 100).unwrap();
    let mut trimmed = snapshot(&c);
    if m.has_recurrent_state() {
        let refused = trimmed.iter_mut().filter(|l| l.is_recurrent()).map(|l| l.trim_to(k as i32)).filter(Result::is_err).count();
        assert!(refused > 0, "{name}: a recurrent state was trimmed");
        eprintln!("{name} trimmed: refused by {refused} recurrent layers");
    } else {
        for l in &mut trimmed {
            l.trim_to(k as i32).unwrap();
        }
        let (l, t) = resume(m, trimmed, &prompt[k..]);
        let d = max_diff(&l, &want_logits);
        eprintln!("{name} trimmed: max logit difference {d:.2e}");
        assert!(d < tol, "{name}: trimmed snapshot: logits differ by {d}");
        assert_eq!(t, want_tokens, "{name}: trimmed snapshot: greedy tokens");
    }

    // Disk: written by the store, read back.
    let dir = tmp(name);
    let store = Store::open(&dir, "fp-test".into()).unwrap();
    let path = store.save(&prompt[..k], &snap).unwrap();
    store.flush();
    let (found, warnings) = store::scan(&dir, "fp-test");
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].tokens, &prompt[..k]);
    let back = store::load(&path, m.num_layers(), k, "fp-test").unwrap();
    let (l, t) = resume(m, back, &prompt[k..]);
    let d = max_diff(&l, &want_logits);
    eprintln!("{name} from disk: max logit difference {d:.2e}");
    assert!(d < tol, "{name}: snapshot from disk: logits differ by {d}");
    assert_eq!(t, want_tokens, "{name}: snapshot from disk: greedy tokens");

    // Another fingerprint, or a truncated file: refused with a reason, no panic.
    assert!(store::load(&path, m.num_layers(), k, "other-model").is_err());
    let (found, warnings) = store::scan(&dir, "other-model");
    assert!(found.is_empty() && warnings[0].contains("another model"), "{warnings:?}");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = store::load(&path, m.num_layers(), k, "fp-test").err().expect("a truncated file is refused");
    assert!(e.to_string().contains("truncated"), "{e}");
    let (found, warnings) = store::scan(&dir, "fp-test");
    assert!(found.is_empty() && warnings[0].contains("truncated"), "{warnings:?}");
    std::fs::write(&path, b"not a safetensors file").unwrap();
    assert!(store::load(&path, m.num_layers(), k, "fp-test").is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tiny_models_resume_exactly() {
    for name in TINY {
        let dir = common::fixtures().join("tiny").join(name);
        let cfg = model::load_config(&dir).unwrap();
        let m = model::build(&cfg, model::load_safetensors_dir(&dir).unwrap()).unwrap();
        let v = cfg.vocab_size as u32;
        // Long enough to cross the 256-token buffer step.
        let prompt: Vec<u32> = (0..300u32).map(|i| (i * 37 + 11) % v).collect();
        let other: Vec<u32> = (0..40u32).map(|i| (i * 53 + 5) % v).collect();
        check(name, &m, &prompt, &other, 2e-3);
    }
}

#[test]
fn smollm2_resumes_exactly() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct");
    let m = source::load(dir.to_str().unwrap()).unwrap();
    let text = "The prompt cache keeps the state of the model after a prefix so that the next request computes only what is new. ".repeat(4);
    let prompt = m.tokenizer.encode(&text).unwrap();
    let other = m.tokenizer.encode(" A different continuation that shares nothing after the cut.").unwrap();
    check("smollm2", &m.model, &prompt, &other, 5e-3);
}
