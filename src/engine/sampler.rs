//! Token choice from the last position's logits: greedy, or sampling with
//! temperature, top-k, top-p, min-p and a repetition penalty, seeded.

/// How to choose each token.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables; applied over the last `repetition_window` tokens.
    pub repetition_penalty: f32,
    pub repetition_window: usize,
    /// None: a fresh random seed for each request (as OpenAI and Anthropic
    /// sample); a given seed makes the answer reproducible.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0, min_p: 0.0, repetition_penalty: 1.0, repetition_window: 20, seed: None }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 && self.repetition_penalty == 1.0
    }
}

/// A seed no earlier call returned: the process's random hasher keys
/// (from the OS) over the clock and a counter.
pub fn fresh_seed() -> u64 {
    use std::hash::BuildHasher;
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    std::collections::hash_map::RandomState::new().hash_one((t, n))
}

/// SplitMix64: small, seeded, reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Choose a token from `logits` (modified in place), given the tokens so far.
pub fn sample(logits: &mut [f32], history: &[u32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    if p.repetition_penalty != 1.0 {
        let start = history.len().saturating_sub(p.repetition_window);
        for &t in &history[start..] {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l < 0.0 { *l * p.repetition_penalty } else { *l / p.repetition_penalty };
            }
        }
    }
    if p.temperature <= 0.0 {
        return argmax(logits);
    }
    // Weights relative to the largest logit: exp((l - max) / T), 1 at the top.
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let t = p.temperature;
    let weight = |l: f32| (((l - max) / t) as f64).exp();
    // No full sort: top-k by selection, min-p by a threshold on the weight,
    // and only top-p orders candidates, a growing prefix at a time.
    let desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
    let mut pool: Vec<u32> = (0..logits.len() as u32).collect();
    if p.top_k > 0 && p.top_k < pool.len() {
        pool.select_nth_unstable_by(p.top_k - 1, desc);
        pool.truncate(p.top_k);
    }
    // Top-p's mass is over the top-k set, as before min-p cuts it.
    let pool_mass: f64 = pool.iter().map(|&i| weight(logits[i as usize])).sum();
    if p.min_p > 0.0 {
        let floor = p.min_p as f64;
        pool.retain(|&i| weight(logits[i as usize]) >= floor);
    }
    if p.top_p < 1.0 && pool.len() > 1 {
        let mut m = pool.len().min(64);
        loop {
            if m < pool.len() {
                pool.select_nth_unstable_by(m - 1, desc);
            }
            pool[..m].sort_unstable_by(desc);
            let mut acc = 0.0;
            let mut keep = None;
            for (n, &i) in pool[..m].iter().enumerate() {
                acc += weight(logits[i as usize]) / pool_mass;
                if acc >= p.top_p as f64 {
                    keep = Some(n + 1);
                    break;
                }
            }
            match keep {
                Some(n) => {
                    pool.truncate(n);
                    break;
                }
                None if m == pool.len() => break,
                None => m = (m * 4).min(pool.len()),
            }
        }
    }
    if pool.is_empty() {
        return argmax(logits);
    }
    let total: f64 = pool.iter().map(|&i| weight(logits[i as usize])).sum();
    let mut r = rng.next_f64() * total;
    for &i in &pool {
        r -= weight(logits[i as usize]);
        if r <= 0.0 {
            return i;
        }
    }
    // Rounding (or NaN logits) left some of `r`: the last candidate.
    pool[pool.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest() {
        let mut l = vec![0.1, 3.0, -1.0, 2.9];
        assert_eq!(sample(&mut l, &[], &SamplingParams::default(), &mut Rng::new(1)), 1);
    }

    #[test]
    fn repetition_penalty_changes_the_choice() {
        let mut l = vec![0.0, 3.0, 2.0];
        let p = SamplingParams { repetition_penalty: 2.0, ..Default::default() };
        assert_eq!(sample(&mut l, &[1], &p, &mut Rng::new(1)), 2);
        assert_eq!(l[1], 1.5);
    }

    #[test]
    fn top_k_one_is_greedy_whatever_the_temperature() {
        let p = SamplingParams { temperature: 5.0, top_k: 1, ..Default::default() };
        let mut rng = Rng::new(7);
        for _ in 0..100 {
            let mut l = vec![0.0, 1.0, 0.5, 0.9];
            assert_eq!(sample(&mut l, &[], &p, &mut rng), 1);
        }
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let p = SamplingParams { temperature: 1.0, ..Default::default() };
        let logits = [0.0f32, (3.0f32).ln()]; // probabilities 1/4, 3/4
        let mut rng = Rng::new(42);
        let n = 20_000;
        let ones = (0..n).filter(|_| sample(&mut logits.clone(), &[], &p, &mut rng) == 1).count();
        let share = ones as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.02, "share {share}");
        let run = |seed| (0..50).map(|_| 0).scan(Rng::new(seed), |r, _: i32| Some(sample(&mut logits.clone(), &[], &p, r))).collect::<Vec<_>>();
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let logits = [5.0f32, 4.9, -5.0, -6.0];
        let mut rng = Rng::new(9);
        let p = SamplingParams { temperature: 1.0, top_p: 0.9, ..Default::default() };
        let q = SamplingParams { temperature: 1.0, min_p: 0.1, ..Default::default() };
        for _ in 0..2000 {
            assert!(sample(&mut logits.clone(), &[], &p, &mut rng) < 2);
            assert!(sample(&mut logits.clone(), &[], &q, &mut rng) < 2);
        }
    }

    /// The kept set and its probabilities equal those of sorting every
    /// logit (the old way), for each cut and their mixes.
    #[test]
    fn partial_selection_keeps_what_a_full_sort_keeps() {
        let mut rng = Rng::new(5);
        let logits: Vec<f32> = (0..3000).map(|_| (rng.next_f64() * 12.0 - 6.0) as f32).collect();
        let reference = |p: &SamplingParams| -> Vec<u32> {
            let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
            idx.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
            if p.top_k > 0 {
                idx.truncate(p.top_k);
            }
            let max = logits[idx[0] as usize];
            let w: Vec<f64> = idx.iter().map(|&i| (((logits[i as usize] - max) / p.temperature) as f64).exp()).collect();
            let total: f64 = w.iter().sum();
            let mut keep = idx.len();
            if p.min_p > 0.0 {
                keep = keep.min(w.iter().take_while(|&&x| x >= p.min_p as f64).count().max(1));
            }
            if p.top_p < 1.0 {
                let mut acc = 0.0;
                let n = w[..keep].iter().take_while(|&&x| { let before = acc; acc += x / total; before < p.top_p as f64 }).count();
                keep = n.max(1);
            }
            let mut kept = idx[..keep].to_vec();
            kept.sort_unstable();
            kept
        };
        for (top_k, top_p, min_p) in [(0, 1.0, 0.0), (40, 1.0, 0.0), (0, 0.9, 0.0), (0, 0.999, 0.0), (0, 1.0, 0.05), (50, 0.8, 0.01), (0, 0.5, 0.2), (1, 1.0, 0.0)] {
            let p = SamplingParams { temperature: 0.7, top_k, top_p, min_p, ..Default::default() };
            let want = reference(&p);
            // Every draw lands in the reference set, and over many draws every member is drawn.
            let mut seen = std::collections::BTreeSet::new();
            let mut r = Rng::new(11);
            for _ in 0..if want.len() < 60 { 4000 } else { 300 } {
                let i = sample(&mut logits.clone(), &[], &p, &mut r);
                assert!(want.binary_search(&i).is_ok(), "{top_k}/{top_p}/{min_p}: drew {i} outside the kept set");
                seen.insert(i);
            }
            if want.len() < 60 {
                assert_eq!(seen.len(), want.len(), "{top_k}/{top_p}/{min_p}: kept set {want:?}, drew {seen:?}");
            }
        }
    }
}
