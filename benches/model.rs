//! The real SmolLM2-135M-Instruct (`make model`): prefill tokens/s at 512 and
//! 2048 prompt tokens, decode tokens/s, and peak MLX memory (printed). The
//! same prompts and measures for mlx-lm: benches/mlx_lm_generate.py
//! (`make bench` runs both).

use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvserve::cache::kv::new_cache;
use kvserve::engine::generate::{generate, prefill, GenerateOptions};
use kvserve::mlx;
use kvserve::model::source::{self, LoadedModel};

/// The benchmark text; benches/mlx_lm_generate.py builds the same one.
fn bench_text() -> String {
    (0..4000).map(|i| format!("item {i} maps to {} in table {};", i * 7 % 13, i % 5)).collect::<Vec<_>>().join(" ")
}

fn load() -> (LoadedModel, Vec<u32>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct");
    assert!(dir.join("config.json").exists(), "run `make model` first");
    let m = source::load(dir.to_str().unwrap()).unwrap();
    let ids = m.tokenizer.encode(&bench_text()).unwrap();
    (m, ids)
}

fn prefill_bench(c: &mut Criterion) {
    let (m, ids) = load();
    let mut group = c.benchmark_group("smollm2_prefill");
    group.sample_size(10).warm_up_time(Duration::from_secs(1));
    for n in [512usize, 2048] {
        let prompt = &ids[..n];
        group.throughput(Throughput::Elements(n as u64));
        mlx::reset_peak_memory().unwrap();
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let mut cache = new_cache(m.model.num_layers());
                prefill(&m.model, &mut cache, prompt, kvserve::engine::generate::PREFILL_CHUNK).unwrap()
            })
        });
        eprintln!("smollm2_prefill/{n}: peak MLX memory {:.1} MB", mlx::peak_memory().unwrap() as f64 / 1e6);
    }
    group.finish();
}

fn decode_bench(c: &mut Criterion) {
    let (m, ids) = load();
    let prompt = &ids[..32];
    const TOKENS: usize = 64;
    let opts = GenerateOptions { max_tokens: TOKENS, eos_ids: vec![], ..Default::default() };
    let mut group = c.benchmark_group("smollm2_decode");
    group.sample_size(10).warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(TOKENS as u64));
    let mut peak = 0;
    group.bench_function(BenchmarkId::from_parameter(TOKENS), |b| {
        // Time only the decode steps (generation_secs), not the 32-token prompt.
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut cache = new_cache(m.model.num_layers());
                let stats = generate(&m.model, &m.tokenizer, &mut cache, prompt, &opts, &mut |_| true).unwrap();
                assert_eq!(stats.generated_tokens, TOKENS);
                // Tokens over the time after the first token, as mlx-lm counts.
                total += Duration::from_secs_f64(stats.generation_secs);
                peak = peak.max(stats.peak_memory);
            }
            total
        })
    });
    group.finish();
    eprintln!("smollm2_decode: peak MLX memory {:.1} MB", peak as f64 / 1e6);
}

criterion_group!(benches, prefill_bench, decode_bench);
criterion_main!(benches);
