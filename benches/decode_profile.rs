//! Where a decode step's time goes (SmolLM2, `make model`): building the
//! MLX graph (our Rust), MLX evaluating it (its kernels), reading the token
//! and detokenizing (ours); and the physical limit: weight bytes read per
//! token over this machine's memory bandwidth. Prints a table; run with
//! `cargo bench --bench decode_profile`.

use std::path::PathBuf;
use std::time::Instant;

use kvserve::cache::kv::{new_cache, LayerKv};
use kvserve::engine::generate::prefill;
use kvserve::model::source;
use kvserve::text::detok::StreamDetokenizer;
use mlx_rs::ops::indexing::{argmax_axis, IndexOp};
use mlx_rs::Array;

fn main() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct");
    let m = source::load(dir.to_str().unwrap()).expect("run `make model` first");
    let prompt = m.tokenizer.encode("Write a long story about a lighthouse keeper.").unwrap();
    // KVSERVE_PROFILE=chunks or =batch: only that table.
    match std::env::var("KVSERVE_PROFILE").as_deref() {
        Ok("chunks") => return chunk_table(&m.model, &prompt),
        Ok("batch") => return batch_table(&m.model, &prompt),
        _ => {}
    }
    let mut cache = new_cache(m.model.num_layers());
    let mut logits = prefill(&m.model, &mut cache, &prompt, 512).unwrap();
    let mut detok = StreamDetokenizer::new();
    const STEPS: usize = 96;
    let (mut build, mut eval, mut read, mut text) = (0.0, 0.0, 0.0, 0.0);
    let t_all = Instant::now();
    for _ in 0..STEPS {
        // Synchronous steps (no overlap) so each part can be timed alone.
        let t = Instant::now();
        let y = argmax_axis(&logits, -1, None).unwrap();
        let next = m.model.forward(&y.reshape(&[1, 1]).unwrap(), &mut cache, true).unwrap().index((0, 0, ..));
        build += t.elapsed().as_secs_f64();
        let t = Instant::now();
        next.eval().unwrap();
        eval += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let id = y.item_exact::<u32>();
        read += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _ = detok.push(&m.tokenizer, id).unwrap();
        text += t.elapsed().as_secs_f64();
        logits = next;
    }
    let total = t_all.elapsed().as_secs_f64();
    let per = |x: f64| x / STEPS as f64 * 1e3;
    println!("decode step, SmolLM2-135M 4-bit, {STEPS} steps, synchronous:");
    println!("| part | ms/step | share |\n|---|---|---|");
    for (name, x) in [("graph building (kvserve; on the CPU also kvserve's quantized kernels and MLX evaluating the ops between them)", build), ("MLX evaluation (what is left of the graph)", eval), ("reading the token", read), ("detokenizing (kvserve)", text)] {
        println!("| {name} | {:.2} | {:.1}% |", per(x), 100.0 * x / total);
    }
    println!("| total | {:.2} | {:.2} tok/s |", per(total), STEPS as f64 / total);

    // Decode with a long context: the cache filled with random f16 keys and
    // values (attention costs the same whatever they hold), then greedy steps.
    println!("\ndecode with context (cache of random f16 keys/values, 32 greedy steps):");
    println!("| context tokens | ms/step | tok/s |\n|---|---|---|");
    for ctx in [256, 3300, 12_000] {
        let mut cache = random_cache(&m.model, ctx);
        let mut y = Array::from_slice(&[prompt[0] as i32], &[1, 1]);
        // One step to warm up (the first write grows the buffers).
        let l = m.model.forward(&y, &mut cache, true).unwrap();
        y = argmax_axis(l.index((0, 0, ..)), -1, None).unwrap().reshape(&[1, 1]).unwrap();
        y.eval().unwrap();
        const N: usize = 32;
        let t = Instant::now();
        for _ in 0..N {
            let l = m.model.forward(&y, &mut cache, true).unwrap();
            y = argmax_axis(l.index((0, 0, ..)), -1, None).unwrap().reshape(&[1, 1]).unwrap();
            y.eval().unwrap();
        }
        let per = t.elapsed().as_secs_f64() / N as f64;
        println!("| {ctx} | {:.2} | {:.1} |", per * 1e3, 1.0 / per);
    }

    chunk_table(&m.model, &prompt);
    batch_table(&m.model, &prompt);

    // Memory bandwidth: MLX summing a 512 MB array (all cores), best of 3.
    let n = 128 << 20;
    let a = mlx_rs::random::uniform::<_, f32>(0.0, 1.0, &[n], None).unwrap();
    a.eval().unwrap();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let s = a.sum(None).unwrap();
        s.eval().unwrap();
        best = best.min(t.elapsed().as_secs_f64());
    }
    let gbs = (n * 4) as f64 / best / 1e9;
    let weights: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    println!("memory bandwidth (MLX sum over 512 MB): {gbs:.1} GB/s");
    println!("weights read per token: {:.1} MB -> bandwidth limit {:.0} tok/s", weights as f64 / 1e6, gbs * 1e9 / weights as f64);
    let _ = Array::from_int(0);
}

/// A warm turn's new tokens, or one prefill chunk: `n` tokens computed on
/// top of a cached prefix (what the scheduler's chunk size is chosen from).
fn chunk_table(model: &kvserve::model::Transformer, prompt: &[u32]) {
    // A warm turn: a few new tokens computed on top of a long cached prefix.
    println!("\nnew tokens on top of a cached prefix (random f16 keys/values), best of 3:");
    println!("| cached tokens | new tokens | ms |\n|---|---|---|");
    // KVSERVE_PROFILE_CHUNK=N: only N new tokens on 12K, 6 times (for a profiler).
    let only: Option<usize> = std::env::var("KVSERVE_PROFILE_CHUNK").ok().and_then(|v| v.parse().ok());
    let (contexts, sizes): (&[i32], Vec<usize>) = match only {
        Some(n) => (&[12_000], vec![n; 2]),
        None => (&[3300, 12_000], vec![16, 32, 33, 64, 128, 256, 512]),
    };
    let cfg = &model.config;
    for &ctx in contexts {
        let base = random_cache(model, ctx);
        for n in sizes.iter().copied() {
            let mut best = f64::MAX;
            for _ in 0..if only.is_some() { 6 } else { 3 } {
                // A copy of the cached prefix, with room for the new tokens
                // made before the clock starts (as the engine reserves a
                // prompt's room when it takes the request).
                let mut cache: Vec<LayerKv> = base.iter().map(LayerKv::snapshot).collect();
                for l in &mut cache {
                    l.reserve(ctx + n as i32, cfg.num_kv_heads, cfg.head_dim).unwrap();
                }
                mlx_rs::transforms::eval(cache.iter().flat_map(LayerKv::arrays)).unwrap();
                let ids: Vec<u32> = prompt.iter().copied().cycle().take(n).collect();
                let t = Instant::now();
                prefill(model, &mut cache, &ids, 512).unwrap().eval().unwrap();
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!("| {ctx} | {n} | {:.0} |", best * 1e3);
        }
    }

}

/// Batched decode: B sequences, each with its own cache of `ctx` tokens,
/// one step for all of them at once (`Transformer::decode_batch`, what the
/// scheduler runs), against B single-row steps.
fn batch_table(model: &kvserve::model::Transformer, prompt: &[u32]) {
    println!("\nbatched decode (each sequence its own cache of random f16 keys/values; 16 steps, best of 2):");
    println!("| context tokens | rows | ms/step | tok/s (all rows) | x one row |\n|---|---|---|---|---|");
    // KVSERVE_PROFILE_ROWS=B: only B rows at 256 tokens, 200 steps (for a profiler).
    let only: Option<usize> = std::env::var("KVSERVE_PROFILE_ROWS").ok().and_then(|v| v.parse().ok());
    let (contexts, rows): (&[i32], Vec<usize>) = match only {
        Some(b) => (&[256], vec![b]),
        None => (&[256, 3300], vec![1, 2, 4, 8]),
    };
    for &ctx in contexts {
        let mut one = 0.0;
        for b in rows.iter().copied() {
            let mut best = f64::MAX;
            for _ in 0..2 {
                let mut caches: Vec<Vec<LayerKv>> = (0..b).map(|_| random_cache(model, ctx)).collect();
                let tokens: Vec<u32> = prompt.iter().copied().cycle().take(b).collect();
                let step = |caches: &mut Vec<Vec<LayerKv>>| {
                    let mut refs: Vec<&mut [LayerKv]> = caches.iter_mut().map(|c| c.as_mut_slice()).collect();
                    model.decode_batch(&tokens, &mut refs).unwrap().eval().unwrap();
                };
                step(&mut caches);
                let n = if only.is_some() { 200 } else { 16 };
                let t = Instant::now();
                for _ in 0..n {
                    step(&mut caches);
                }
                best = best.min(t.elapsed().as_secs_f64() / n as f64);
            }
            if b == 1 {
                one = best;
            }
            println!("| {ctx} | {b} | {:.2} | {:.1} | {:.2} |", best * 1e3, b as f64 / best, b as f64 * one / best);
        }
    }
}

/// A KV cache of `tokens` random f16 keys and values for every layer.
fn random_cache(model: &kvserve::model::Transformer, tokens: i32) -> Vec<LayerKv> {
    let cfg = &model.config;
    let shape = [1, cfg.num_kv_heads, tokens, cfg.head_dim];
    (0..model.num_layers())
        .map(|_| {
            let r = || mlx_rs::random::normal::<f32>(&shape, None, None, None).unwrap().as_dtype(mlx_rs::Dtype::Float16).unwrap();
            let (k, v) = (r(), r());
            mlx_rs::transforms::eval([&k, &v]).unwrap();
            LayerKv::from_state(k, v).unwrap()
        })
        .collect()
}
