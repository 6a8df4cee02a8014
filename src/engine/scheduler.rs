//! The step scheduler: every running request is a [`Sequence`], and each
//! step runs one batched decode step over every sequence that is decoding,
//! then one prefill chunk for one sequence that is still computing its
//! prompt. So a long cold prompt never holds the others back for more than
//! one chunk, and a side call (a short prompt) overtakes it.
//!
//! Policy:
//! - **Admission.** Up to `parallel` sequences run at once; the rest wait,
//!   shortest prompt first (ties: oldest). A waiting request whose prompt
//!   shares a long prefix with one being computed right now waits for that
//!   prefix to be done and kept as a snapshot instead of computing it too.
//! - **Which prefill.** The sequence with the fewest prompt tokens left.
//! - **Chunk size.** Chosen from the recent chunks' measured costs, fitted
//!   as a fixed part (dequantizing the weights, running each layer's graph:
//!   the same for any length) plus a part per token ([`ChunkCost`]), so
//!   that a chunk takes about
//!   [`CHUNK_SECS_DECODING`] while others decode (their next token waits for
//!   it) and [`CHUNK_SECS_ALONE`] otherwise (a request that arrives waits for
//!   it), up to the configured maximum; but never so short that the fixed
//!   part is more than [`MAX_FIXED_SHARE`] of it (a large model's chunks
//!   would otherwise shrink toward the floor, each paying the fixed part
//!   again, making prefill slower still). On the CPU a
//!   chunk of at most 32 tokens runs on kvserve's kernels and a larger one on
//!   dequantize + BLAS, which round differently; so that a prompt computes
//!   the same whatever runs beside it, a chunk is never that small unless it
//!   is all the prompt has left, and never leaves that little behind
//!   ([`chunk_len`]).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::generate::prefill;
use super::policy::CachePolicy;
use super::sequence::Sequence;
use super::types::{Event, FinishReason, Job, ModelInfo, PromptUsage};
use super::worker::EngineConfig;
use crate::cache::kv::{new_cache, LayerKv, STEP};
use crate::cache::prefix::CacheStats;
use crate::model::source::{self, LoadedModel};
use crate::model::layers::CPU_KERNEL_MAX_ROWS;
use crate::model::Transformer;

/// Seconds a prefill chunk may take while other sequences decode.
pub const CHUNK_SECS_DECODING: f64 = 0.25;
/// Seconds a prefill chunk may take while nothing decodes: a request that
/// arrives meanwhile (a side call) waits for the chunk under way. From
/// `KVSERVE_PROFILE=chunks cargo bench --bench decode_profile` here: at 3.3K
/// cached tokens 128/256/512-token chunks take 0.80/1.26/2.94 s (160/203/174
/// tok/s), at 12K 1.9/3.4/7.1 s (67/74/72 tok/s); so 1.2 s costs a cold
/// prompt little and keeps a side call's wait well under 2 s.
pub const CHUNK_SECS_ALONE: f64 = 1.2;
/// The most of a chunk's time its fixed cost may take: a model whose
/// chunks cost 0.6 s whatever their length gets chunks of at least 4 s.
pub const MAX_FIXED_SHARE: f64 = 0.15;
/// The smallest chunk while nothing decodes (unless the prompt's rest is
/// smaller): below about 128 rows a BLAS product runs well under its peak
/// (a 1.1B model here: 128 tokens at 17 ms each past a 0.6 s fixed part,
/// 33 at 36 ms each), so a large model's chunks stop at this even where
/// [`CHUNK_SECS_ALONE`] would want fewer tokens; a small model's reach it anyway.
pub const ALONE_MIN_CHUNK: usize = 128;
/// Chunks the cost line is fitted over.
pub const COST_SAMPLES: usize = 8;
/// The first chunk, before any was measured.
pub const FIRST_CHUNK: usize = 128;
/// The smallest chunk but a prompt's whole rest: one more than the rows the
/// CPU kernels take (see [`chunk_len`]).
pub const MIN_CHUNK: usize = CPU_KERNEL_MAX_ROWS as usize + 1;
/// A request waiting to start, or a prompt waiting for its next chunk,
/// longer than this goes first, whatever its length: shorter ones never
/// hold it back for good.
pub const MAX_WAIT: Duration = Duration::from_secs(5);
/// A waiting request waits for a running one's prefix only when that saves
/// at least this many tokens over what the cache already serves.
pub const MIN_SHARED_PREFIX: usize = 32;

pub(super) struct Scheduler {
    model: Transformer,
    pub info: Arc<ModelInfo>,
    pub policy: CachePolicy,
    max_chunk: usize,
    parallel: usize,
    /// Arrived and not yet running (counted in `queued`).
    waiting: VecDeque<(u64, Job, Instant)>,
    running: Vec<Sequence>,
    next_id: u64,
    queued: Arc<AtomicUsize>,
    /// What a prefill chunk costs, fitted over `chunk_samples`.
    prefill_cost: Option<ChunkCost>,
    /// The last chunks' (tokens, seconds, seconds dequantizing), for the fit.
    chunk_samples: VecDeque<(usize, f64, f64)>,
    /// Test hook: the next job panics at its first text.
    pub inject_panic: Arc<AtomicBool>,
    /// Published after every step.
    load: Arc<Load>,
}

/// What the engine is doing, published for `/health`, metrics and tests.
#[derive(Default)]
pub struct Load {
    /// Requests being computed (prefill or decode).
    pub running: AtomicUsize,
    /// Steps run since start.
    pub steps: AtomicU64,
    /// Rows in the last decode step.
    pub batch_rows: AtomicUsize,
}

/// A step's failure: these sequences (by id) failed with this message.
struct StepError(Vec<u64>, String);

impl Scheduler {
    pub fn new(cfg: &EngineConfig, stats: Arc<Mutex<CacheStats>>, queued: Arc<AtomicUsize>, load: Arc<Load>) -> Result<(Scheduler, Arc<ModelInfo>), String> {
        let LoadedModel { model, tokenizer, template, eos_ids, path, name } = match &cfg.pipeline {
            Some(p) => lead_pipeline(cfg, p)?,
            None => source::load(&cfg.model).map_err(|e| e.to_string())?,
        };
        // Warm up (first-use costs out of the first request) and measure the
        // KV bytes per token.
        let mut kv = new_cache(model.num_layers());
        prefill(&model, &mut kv, &[tokenizer.eos_ids.first().copied().unwrap_or(0)], 1).map_err(|e| e.to_string())?;
        let kv_bytes_per_token = kv.iter().map(LayerKv::kv_nbytes).sum::<usize>() / STEP as usize;
        let trained = model.config.context_length.max(1) as usize;
        let context = cfg.context_override.unwrap_or(trained);
        if context > trained {
            tracing::warn!("context set to {context} tokens; the model was trained on {trained}: answers past that may be poor");
        }
        let kv_bits = cfg.kv_bits.map(i32::from);
        let exact_cache = model.has_recurrent_state();
        let policy =
            CachePolicy::open(
            cfg.cache_bytes,
            cfg.cache_dir.as_deref(),
            &cfg.cache_disk,
            &path,
            tokenizer.chat_template.as_deref(),
            model.stage().map(|s| s.share_name(0)),
            model.num_layers(),
            kv_bits,
            exact_cache,
            stats,
        );
        let snapshot_dir = policy.dir().map(Path::to_path_buf);
        let info = Arc::new(ModelInfo { name, path, tokenizer, template, eos_ids, context, kv_bytes_per_token, snapshot_dir, exact_cache });
        let s = Scheduler {
            model,
            info: info.clone(),
            policy,
            max_chunk: cfg.prefill_chunk.max(MIN_CHUNK),
            parallel: cfg.parallel.max(1),
            waiting: VecDeque::new(),
            running: vec![],
            next_id: 0,
            queued,
            prefill_cost: None,
            chunk_samples: VecDeque::new(),
            inject_panic: Arc::new(AtomicBool::new(false)),
            load,
        };
        Ok((s, info))
    }

    /// Send the other ranks of a pipeline the cache operations queued since
    /// the last step (snapshots dropped while idle free their shares).
    pub fn flush_remote(&mut self) {
        if let Some(stage) = self.model.stage() {
            if let Err(e) = stage.flush() {
                tracing::warn!("{e}");
            }
        }
    }

    /// Tell the other ranks of a pipeline to exit (this one is shutting down).
    pub fn stop_followers(&mut self) {
        if let Some(stage) = self.model.stage() {
            if let Err(e) = stage.stop() {
                tracing::warn!("{e}");
            }
        }
    }

    /// Nothing running or waiting.
    pub fn idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    pub fn submit(&mut self, job: Job) {
        self.waiting.push_back((self.next_id, job, Instant::now()));
        self.next_id += 1;
    }

    /// One step: clients gone leave, waiting requests are admitted, one
    /// decode step for every decoding sequence, one prefill chunk, and the
    /// sequences that ended are kept and answered. An `Err` is the text of
    /// a failure MLX itself may have caused (the caller checks MLX).
    pub fn step(&mut self) -> Result<(), String> {
        for s in &mut self.running {
            if s.finish.is_none() && s.departed() {
                s.finish = Some(FinishReason::Cancelled);
            }
        }
        let before = self.waiting.len();
        self.waiting.retain(|(_, j, _)| !j.events.is_closed());
        self.unqueue(before - self.waiting.len());
        self.admit();
        let mut failure = None;
        if self.running.iter().any(Sequence::decoding) {
            if let Err(StepError(ids, why)) = self.decode_step() {
                self.fail(&ids, &why);
                failure = Some(why);
            }
        }
        if let Err(StepError(ids, why)) = self.prefill_step() {
            self.fail(&ids, &why);
            failure = Some(why);
        }
        self.finish_ended();
        self.load.running.store(self.running.len(), Ordering::SeqCst);
        self.load.steps.fetch_add(1, Ordering::SeqCst);
        failure.map_or(Ok(()), Err)
    }

    fn unqueue(&self, n: usize) {
        if n > 0 {
            let _ = self.queued.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| Some(q.saturating_sub(n)));
        }
    }

    /// Start waiting requests while there is room: shortest prompt first,
    /// except one that waits for a running sequence's shared prefix.
    fn admit(&mut self) {
        while self.running.len() < self.parallel {
            // Shortest prompt first, but one that waited past MAX_WAIT first of all (oldest first).
            let mut order: Vec<usize> = (0..self.waiting.len()).collect();
            let waited = |i: usize| self.waiting[i].2.elapsed() > MAX_WAIT;
            order.sort_by_cached_key(|&i| (!waited(i), if waited(i) { 0 } else { self.waiting[i].1.prompt.len() }, self.waiting[i].0));
            let Some(i) = order.into_iter().find(|&i| !self.waits_for_shared_prefix(i)) else { return };
            let (id, job, start) = self.waiting.remove(i).expect("index from the list");
            self.start(id, job, start);
            // Running before it leaves the queue's count, so `Engine::submit`
            // never sees it in neither (it may briefly see it in both).
            self.load.running.store(self.running.len(), Ordering::SeqCst);
            self.unqueue(1);
        }
    }

    /// Whether waiting request `i` should wait for a running sequence that
    /// is computing a long prefix of its prompt. When that sequence is
    /// already past the shared part, the part is kept as a snapshot now
    /// (the request then reads it) and this returns false.
    fn waits_for_shared_prefix(&mut self, i: usize) -> bool {
        let prompt = &self.waiting[i].1.prompt;
        let n = prompt.len();
        if n < 2 {
            return false;
        }
        let cached = self.policy.cache.usable(prompt, n - 1);
        let best = self
            .running
            .iter()
            .filter(|s| s.finish.is_none())
            .map(|s| (s.id, common_prefix(prompt, s.prompt()).min(n - 1)))
            .filter(|&(_, c)| c >= cached + MIN_SHARED_PREFIX)
            .max_by_key(|&(_, c)| c);
        let Some((sid, c)) = best else { return false };
        let exact = self.policy.exact();
        let s = self.running.iter_mut().find(|s| s.id == sid).expect("found above");
        if s.pos() < c {
            s.share_at = Some(s.share_at.map_or(c, |a| a.min(c)));
            return true;
        }
        // A state that cannot be trimmed is kept only exactly at c (the
        // prefill keeps it there itself when its chunk stops at c).
        if exact && s.pos() != c {
            return false;
        }
        // Past it: keep a copy of the shared part now (just those tokens:
        // not the running sequence's whole buffers, which it goes on writing).
        let part: Result<Vec<LayerKv>, _> = s
            .live
            .iter()
            .map(|l| {
                let mut t = l.snapshot();
                t.trim_to(c as i32)?;
                Ok::<_, crate::mlx::MlxError>(t.compact())
            })
            .collect();
        let Ok(part) = part else { return false };
        let tokens = prompt[..c].to_vec();
        if self.policy.keep(&tokens, c, &part).is_some() {
            tracing::info!("a request reads {c} tokens of prompt another one just computed");
        }
        false
    }

    /// Look up the cache and make the job a running sequence.
    fn start(&mut self, id: u64, job: Job, start: Instant) {
        let n = job.prompt.len();
        if n == 0 {
            let _ = job.events.send(Event::Error("the prompt is empty".into()));
            return;
        }
        let lookup = self.policy.lookup(&job.prompt);
        let read = lookup.read;
        tracing::debug!("lookup: {read} tokens from cache in {:.0} ms", start.elapsed().as_secs_f64() * 1e3);
        let planned_tokens = (n + job.opts.max_tokens).div_ceil(STEP as usize) * STEP as usize;
        let fits = planned_tokens * self.info.kv_bytes_per_token <= self.policy.budget();
        let creation = if fits { n - read } else { 0 };
        let usage = PromptUsage { prompt: n, cache_read: read, cache_creation: creation, input: n - read - creation };
        let mut s = Sequence::new(id, job, start, lookup.live, read, usage, lookup.held);
        s.panic_at_text = self.inject_panic.swap(false, Ordering::SeqCst);
        if s.job.events.send(Event::Started(usage)).is_err() {
            // Gone already: what was read goes back to the cache.
            s.finish = Some(FinishReason::Cancelled);
        } else if s.job.opts.max_tokens == 0 {
            s.finish = Some(FinishReason::Length);
        } else {
            // Room for the whole prompt at once (one copy instead of one per chunk).
            if let Err(e) = self.model.reserve(&mut s.live, n as i32) {
                s.failed = Some(e.to_string());
            }
        }
        self.running.push(s);
    }

    /// One decode step over every decoding sequence, in one batch.
    fn decode_step(&mut self) -> Result<(), StepError> {
        let mut rows: Vec<&mut Sequence> = self.running.iter_mut().filter(|s| s.decoding()).collect();
        let ids: Vec<u64> = rows.iter().map(|s| s.id).collect();
        let fail = |e: String| StepError(ids.clone(), e);
        let tokens: Vec<u32> = rows.iter_mut().map(|s| s.next_input()).collect();
        self.load.batch_rows.store(rows.len(), Ordering::SeqCst);
        let logits = {
            let mut caches: Vec<&mut [LayerKv]> = rows.iter_mut().map(|s| s.live.as_mut_slice()).collect();
            self.model.decode_batch(&tokens, &mut caches).map_err(|e| fail(e.to_string()))?
        };
        let logits = logits.as_type::<f32>().map_err(|e| fail(e.to_string()))?;
        logits.eval().map_err(|e| fail(e.to_string()))?;
        let values = logits.try_as_slice::<f32>().map_err(|e| fail(e.to_string()))?;
        let vocab = values.len() / rows.len().max(1);
        for (s, row) in rows.iter_mut().zip(values.chunks_exact(vocab)) {
            let mut row = row.to_vec();
            if let Err(e) = s.accept(&mut row, &self.info.tokenizer) {
                s.failed = Some(e);
            }
        }
        Ok(())
    }

    /// One chunk of prompt for the sequence with the fewest tokens left.
    fn prefill_step(&mut self) -> Result<(), StepError> {
        let decoding = self.running.iter().any(Sequence::decoding);
        // The fewest tokens left first, but a prompt that got no chunk for
        // MAX_WAIT first of all.
        let Some(s) = self
            .running
            .iter_mut()
            .filter(|s| s.finish.is_none() && s.failed.is_none() && s.to_prefill() > 0)
            .min_by_key(|s| {
                let starved = s.last_chunk.elapsed() > MAX_WAIT;
                (!starved, if starved { 0 } else { s.to_prefill() }, s.id)
            })
        else {
            return Ok(());
        };
        s.last_chunk = Instant::now();
        let secs = if decoding { CHUNK_SECS_DECODING } else { CHUNK_SECS_ALONE };
        let target = match self.prefill_cost {
            // Alone, never below the rows BLAS needs to run near its peak.
            Some(cost) if decoding => cost.tokens_for(secs),
            // Until the line is known, one chunk of twice the length shows its slope.
            Some(cost) => cost.tokens_for(secs).max(ALONE_MIN_CHUNK) * if cost.fitted { 1 } else { 2 },
            None => FIRST_CHUNK,
        };
        let pos = s.pos();
        let mut chunk = chunk_len(target.min(self.max_chunk), s.to_prefill());
        // Stop where a waiting request's shared prefix ends, to keep it
        // there (unless that would make a chunk of the other kind).
        let mut share_stop = None;
        if let Some(at) = s.share_at.take() {
            if at > pos && chunk_len(at - pos, s.to_prefill()) == at - pos {
                chunk = chunk.min(at - pos);
                share_stop = Some(at);
            }
        }
        // A model whose state cannot be trimmed keeps snapshots where later
        // requests resume: the chunk stops at the next such point (on the
        // same terms).
        let exact = self.policy.exact();
        if exact {
            if let Some(&at) = s.job.cache_points.iter().find(|&&p| p > pos) {
                if chunk_len(at - pos, s.to_prefill()) == at - pos {
                    chunk = chunk.min(at - pos);
                }
            }
        }
        let t = Instant::now();
        let dequant0 = crate::kernels::qgemm::dequant_nanos();
        let part = s.prompt()[pos..pos + chunk].to_vec();
        prefill(&self.model, &mut s.live, &part, chunk).map_err(|e| StepError(vec![s.id], e.to_string()))?;
        let secs = t.elapsed().as_secs_f64();
        let fixed = (crate::kernels::qgemm::dequant_nanos() - dequant0) as f64 * 1e-9;
        if self.chunk_samples.len() == COST_SAMPLES {
            self.chunk_samples.pop_front();
        }
        self.chunk_samples.push_back((chunk, secs, fixed));
        self.prefill_cost = Some(ChunkCost::fit(self.chunk_samples.make_contiguous(), self.prefill_cost));
        tracing::debug!("prefill chunk of {chunk} tokens at {pos} in {:.0} ms ({:.0} ms fixed; {} decoding)", secs * 1e3, fixed * 1e3, decoding);
        let end = pos + chunk;
        // Exactly here: a cache point, a waiting request's shared prefix, or
        // the prompt's end (all but the token the first decode step feeds).
        if exact && (s.job.cache_points.contains(&end) || share_stop == Some(end) || s.to_prefill() == 0) {
            keep_here(&mut self.policy, s, end);
        }
        Ok(())
    }

    /// Sequences that failed in a step: what they read goes back to the
    /// cache (only that is known to be good) and they get the error.
    fn fail(&mut self, ids: &[u64], why: &str) {
        // A lost rank says so in its own words (not as an MLX error).
        let lost = crate::pipeline::broken().then(crate::pipeline::why_broken);
        let why = lost.as_deref().unwrap_or(why);
        for s in self.running.iter_mut().filter(|s| ids.contains(&s.id)) {
            s.failed = Some(why.to_string());
        }
    }

    /// After a panic in a step: every running sequence is dropped with an
    /// error, and the cache entries they held with them (one of them may be
    /// what broke).
    pub fn drop_running(&mut self, why: &str) {
        self.load.running.store(0, Ordering::SeqCst);
        for s in std::mem::take(&mut self.running) {
            let _ = s.job.events.send(Event::Error(format!(
                "internal error: the engine failed on this request ({why}); the request was dropped and the server goes on"
            )));
            self.policy.drop_held(s.held);
        }
    }

    /// Keep the snapshot of each sequence that ended and answer it.
    fn finish_ended(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            if s.finish.is_none() && s.failed.is_none() {
                i += 1;
                continue;
            }
            let mut s = self.running.swap_remove(i);
            self.end(&mut s);
        }
        // Oldest first in the next step's choices, whatever the removals did.
        self.running.sort_by_key(|s| s.id);
    }

    fn end(&mut self, s: &mut Sequence) {
        let n = s.prompt().len();
        let t_keep = Instant::now();
        // One snapshot per request, whatever happened: every token boundary
        // in it is served by trimming it. After an error only what was read
        // is known to be good.
        let tokens = match &s.failed {
            None => s.held_tokens(),
            // A state that cannot be trimmed back to what was read is not kept.
            Some(_) if self.policy.exact() => vec![],
            Some(_) => {
                for l in &mut s.live {
                    let _ = l.trim_to(s.read as i32);
                }
                s.prompt()[..s.read].to_vec()
            }
        };
        let pos = s.pos();
        let bytes: usize = s.live.iter().map(LayerKv::nbytes).sum();
        let stored = pos >= n && bytes <= self.policy.budget();
        let kept = if tokens.is_empty() { None } else { self.policy.keep(&tokens, n.min(tokens.len()), &s.live) };
        s.live.clear();
        self.policy.release(std::mem::take(&mut s.held), kept);
        self.policy.publish();
        match s.failed.take() {
            Some(e) => {
                let _ = s.job.events.send(Event::Error(e));
            }
            None => {
                let done = s.done(stored);
                tracing::info!(
                    "prompt {} tokens ({} from cache, {} computed) in {:.2}s; first token at {:.2}s; {} tokens at {:.1} tok/s; {} running",
                    n,
                    s.read,
                    n - s.read,
                    done.prompt_secs,
                    done.ttft_secs,
                    done.generated_tokens,
                    done.generated_tokens as f64 / done.generation_secs.max(1e-9),
                    self.running.len(),
                );
                let _ = s.job.events.send(Event::Done(done));
            }
        }
        tracing::info!(
            "snapshot of {pos} tokens kept in {:.0} ms; {} snapshots, {:.0} MB; MLX holds {:.0} MB in arrays, {:.0} MB in its buffer cache",
            t_keep.elapsed().as_secs_f64() * 1e3,
            self.policy.cache.len(),
            self.policy.cache.bytes() as f64 / 1e6,
            crate::mlx::active_memory().unwrap_or(0) as f64 / 1e6,
            crate::mlx::cache_memory().unwrap_or(0) as f64 / 1e6,
        );
    }
}

/// Rank 0 of `kvserve serve --hostfile`: join the ring, load the first
/// layers (the other ranks load the rest), check every rank loaded the same
/// model, and make each cache end with the other ranks' entry.
fn lead_pipeline(cfg: &EngineConfig, p: &super::worker::PipelineConfig) -> Result<LoadedModel, String> {
    use crate::pipeline;
    let spec = cfg.model.as_str();
    // A model or split that cannot be served this way is refused before waiting for the others.
    let hosts = crate::ring::Hostfile::read(&p.hostfile)?;
    let planned = pipeline::plan(spec, hosts.size(), p.split)?;
    let group = crate::ring::join(&hosts, 0, p.join_timeout, planned.1 == pipeline::Split::Layers)?;
    let m = pipeline::lead(spec, Arc::new(group), planned, cfg.cache_dir.is_some())?;
    pipeline::watch_steps(p.step_timeout);
    Ok(m)
}

/// What a prompt chunk costs: a fixed part (dequantizing weights, each
/// layer's graph) and the rest per token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChunkCost {
    pub fixed_secs: f64,
    pub per_token_secs: f64,
    /// Fitted through chunks of different lengths (else the fixed part is
    /// only the dequantizing measured, a lower bound).
    pub fitted: bool,
}

impl ChunkCost {
    /// From a chunk of `tokens` that took `secs`, `fixed` of them dequantizing.
    pub fn measured(tokens: usize, secs: f64, fixed: f64) -> Self {
        let fixed = fixed.clamp(0.0, secs);
        ChunkCost { fixed_secs: fixed, per_token_secs: ((secs - fixed) / tokens.max(1) as f64).max(1e-7), fitted: false }
    }

    /// The cost line through recent chunks `(tokens, secs, secs dequantizing)`
    /// by least squares, when their lengths differ enough to show a slope
    /// (a quarter of their mean); else `last` (the fit so far), else the
    /// newest chunk alone with its dequantizing as the fixed part. The fixed
    /// part is never below the dequantizing measured (it is part of it).
    pub fn fit(samples: &[(usize, f64, f64)], last: Option<ChunkCost>) -> Self {
        let Some(&(n, t, f)) = samples.last() else { return last.unwrap_or(ChunkCost { fixed_secs: 0.0, per_token_secs: 1e-3, fitted: false }) };
        let single = Self::measured(n, t, f);
        let k = samples.len() as f64;
        let (mn, mt) = samples.iter().fold((0.0, 0.0), |(a, b), &(n, t, _)| (a + n as f64 / k, b + t / k));
        let dequant = samples.iter().map(|s| s.2).sum::<f64>() / k;
        let (lo, hi) = samples.iter().fold((usize::MAX, 0), |(lo, hi), s| (lo.min(s.0), hi.max(s.0)));
        if (hi - lo) as f64 >= 0.25 * mn {
            let var: f64 = samples.iter().map(|&(n, _, _)| (n as f64 - mn).powi(2)).sum();
            let cov: f64 = samples.iter().map(|&(n, t, _)| (n as f64 - mn) * (t - mt)).sum();
            let b = cov / var;
            let a = mt - b * mn;
            if b > 0.0 && a.is_finite() {
                let fixed = a.max(dequant).min(mt);
                // Through the mean point: the slope b unless the fixed part was raised.
                return ChunkCost { fixed_secs: fixed, per_token_secs: ((mt - fixed) / mn.max(1.0)).max(1e-7), fitted: true };
            }
        }
        match last {
            // Chunks of one length: the line keeps its fixed part, the slope follows the newest.
            Some(l) if l.fixed_secs < t => {
                ChunkCost { fixed_secs: l.fixed_secs.max(f), per_token_secs: ((t - l.fixed_secs.max(f)) / n.max(1) as f64).max(1e-7), fitted: l.fitted }
            }
            _ => single,
        }
    }

    /// Tokens for a chunk of about `secs`, or more where the fixed part
    /// would be more than [`MAX_FIXED_SHARE`] of it.
    pub fn tokens_for(&self, secs: f64) -> usize {
        let by_time = (secs - self.fixed_secs).max(0.0) / self.per_token_secs;
        let by_share = self.fixed_secs * (1.0 / MAX_FIXED_SHARE - 1.0) / self.per_token_secs;
        by_time.max(by_share).min(1e9) as usize
    }
}

/// The next chunk of a prompt with `left` tokens to compute, about `target`
/// long: the whole rest when it is at most [`MIN_CHUNK`] past the target
/// (so no chunk of a prompt is a small one but a small whole rest), else
/// at least [`MIN_CHUNK`]. A prompt with more than `CPU_KERNEL_MAX_ROWS`
/// tokens left thus computes all of them in chunks of more than that, on
/// the same path whatever the chunk sizes.
fn chunk_len(target: usize, left: usize) -> usize {
    let c = target.max(MIN_CHUNK);
    if left <= c + MIN_CHUNK - 1 {
        left
    } else {
        c
    }
}

/// Keep `s`'s state after its first `end` prompt tokens (where it is now)
/// as a snapshot, copying only what is valid: the buffers the prompt goes on
/// writing stay its own.
fn keep_here(policy: &mut CachePolicy, s: &Sequence, end: usize) {
    debug_assert_eq!(s.pos(), end);
    let part: Vec<LayerKv> = s.live.iter().map(LayerKv::compact).collect();
    if policy.keep(&s.prompt()[..end], end, &part).is_some() {
        tracing::debug!("snapshot of {end} prompt tokens kept");
    }
}

/// How many leading tokens `a` and `b` share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_never_small_unless_they_are_the_whole_rest() {
        assert_eq!(chunk_len(512, 2000), 512);
        assert_eq!(chunk_len(512, 540), 540, "a 28-token rest joins the chunk");
        assert_eq!(chunk_len(512, 545), 512, "a 33-token rest is a chunk of its own");
        assert_eq!(chunk_len(10, 2000), MIN_CHUNK, "the target is raised to the smallest chunk");
        // A large model: 0.4 s to dequantize, 15 ms a token. Alone, 1.2 s
        // would give 53 tokens, but then the fixed part is a third: 151
        // tokens keep it at 15%.
        let big = ChunkCost::measured(33, 0.4 + 33.0 * 0.015, 0.4);
        assert!((big.per_token_secs - 0.015).abs() < 1e-9);
        assert!((150..=151).contains(&big.tokens_for(CHUNK_SECS_ALONE)), "{}", big.tokens_for(CHUNK_SECS_ALONE));
        assert!((150..=151).contains(&big.tokens_for(CHUNK_SECS_DECODING)), "the fixed share rules while others decode too");
        // A small one: 10 ms fixed, 2 ms a token: the time rules.
        let small = ChunkCost::measured(128, 0.01 + 0.256, 0.01);
        assert!((594..=595).contains(&small.tokens_for(CHUNK_SECS_ALONE)));
        assert!((119..=120).contains(&small.tokens_for(CHUNK_SECS_DECODING)));
        // No fixed part measured (MLX's own path): tokens per second as before.
        assert!((119..=120).contains(&ChunkCost::measured(100, 1.0, 0.0).tokens_for(1.2)));
        // Seen with a 1.1B model here: 128 tokens in 2.84 s, 33 in 1.19 s (0.2 s
        // dequantizing each): the line has 0.62 s fixed and 17 ms a token, so
        // chunks of about 200 tokens, not 33.
        let seen = [(128, 2.84, 0.2), (33, 1.19, 0.2)];
        let line = ChunkCost::fit(&seen, None);
        assert!((line.fixed_secs - 0.617).abs() < 0.01 && (line.per_token_secs - 0.01737).abs() < 1e-4, "{line:?}");
        assert!((199..=202).contains(&line.tokens_for(CHUNK_SECS_ALONE)), "{}", line.tokens_for(CHUNK_SECS_ALONE));
        // Then chunks of one length keep the fixed part found.
        let same = ChunkCost::fit(&[(107, 2.5, 0.2), (107, 2.5, 0.2)], Some(line));
        assert_eq!(same.fixed_secs, line.fixed_secs);
        assert!((same.per_token_secs - (2.5 - line.fixed_secs) / 107.0).abs() < 1e-12);
        // One sample and nothing before: as measured.
        assert_eq!(ChunkCost::fit(&[(100, 1.0, 0.1)], None), ChunkCost::measured(100, 1.0, 0.1));
        assert_eq!(chunk_len(40, 20), 20, "a small whole rest");
        // Every way of cutting a prompt keeps all its chunks on one side of the kernels' limit.
        for left in 1..300 {
            for target in [1, 16, 33, 40, 64, 100] {
                let mut rest = left;
                let mut sizes = vec![];
                while rest > 0 {
                    let c = chunk_len(target, rest);
                    assert!(c >= 1 && c <= rest);
                    sizes.push(c);
                    rest -= c;
                }
                let small = |c: &usize| *c <= CPU_KERNEL_MAX_ROWS as usize;
                assert!(sizes.iter().all(small) || !sizes.iter().any(small), "{left} tokens, target {target}: {sizes:?}");
            }
        }
    }

    #[test]
    fn common_prefix_counts_leading_equal_tokens() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
        assert_eq!(common_prefix(&[5], &[1]), 0);
    }
}
