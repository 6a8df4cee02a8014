//! The engine thread: the one thread that owns MLX, the model and the prefix
//! cache. Requests reach it through a bounded queue, each with its own event
//! channel; start-up failure comes back on a ready channel; if the thread
//! dies, submissions fail at once (never a hang).
//!
//! A request that panics is caught: it gets an error, the cache entries it
//! held are dropped, and the engine serves the next one. Only MLX itself
//! failing is beyond repair; then the process logs why and exits non-zero
//! so that its supervisor restarts it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{mpsc as tmpsc, oneshot};

use super::generate::{generate, prefill, FinishReason, GenerateOptions};
use crate::cache::kv::{new_cache, LayerKv, STEP};
use crate::cache::prefix::{CacheStats, Cached, PrefixCache};
use crate::cache::store::{self, Store};
use crate::model::source::{self, LoadedModel};
use crate::model::Transformer;
use crate::text::template::ChatTemplate;
use crate::text::tokenizer::Tokenizer;

/// How the engine is set up.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// A model directory, GGUF file, or Hugging Face repo id.
    pub model: String,
    /// The prefix cache's memory budget in bytes.
    pub cache_bytes: usize,
    /// Where snapshots persist across restarts (none: memory only).
    pub cache_dir: Option<PathBuf>,
    /// Requests that may wait for the engine before new ones are refused.
    pub queue: usize,
    /// Tokens per prefill step.
    pub prefill_chunk: usize,
    /// Use this context length instead of the model's own (beyond what the
    /// model was trained on, quality drops; said at start-up).
    pub context_override: Option<usize>,
}

/// A sensible default budget: a quarter of physical memory, at most 16 GiB.
pub fn default_cache_bytes() -> usize {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok()))
        .map(|kib| kib * 1024)
        .unwrap_or(8 << 30);
    (total / 4).min(16 << 30)
}

/// What the HTTP side needs to know about the model (thread-safe parts).
pub struct ModelInfo {
    pub name: String,
    pub path: PathBuf,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    pub eos_ids: Vec<u32>,
    /// The model's context length in tokens.
    pub context: usize,
    /// Bytes of KV state per token (all layers), as measured at start-up.
    pub kv_bytes_per_token: usize,
}

/// Where a prompt's tokens came from. `cache_read + cache_creation + input == prompt`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PromptUsage {
    pub prompt: usize,
    /// Served from a snapshot.
    pub cache_read: usize,
    /// Computed and stored in a snapshot for reuse.
    pub cache_creation: usize,
    /// Computed and not stored.
    pub input: usize,
}

/// What the engine tells a request, in order: `Started`, `Text`*, then `Done` or `Error`.
#[derive(Debug)]
pub enum Event {
    /// The cache lookup is done; computing the rest of the prompt begins.
    Started(PromptUsage),
    Text(String),
    Done(Done),
    Error(String),
}

#[derive(Debug, Clone)]
pub struct Done {
    pub finish: FinishReason,
    /// The prompt's usage as it turned out (the snapshot stored or not).
    pub usage: PromptUsage,
    pub generated_tokens: usize,
    /// Seconds from the job starting to the first token.
    pub ttft_secs: f64,
    pub prompt_secs: f64,
    pub generation_secs: f64,
}

/// One generation request, already tokenized.
pub struct Job {
    pub prompt: Vec<u32>,
    /// Token positions at which to store snapshots (cache_control breakpoints,
    /// the end of system + tools); the end of the prompt is always one.
    pub breakpoints: Vec<usize>,
    pub opts: GenerateOptions,
    pub events: tmpsc::UnboundedSender<Event>,
}

enum Msg {
    Generate(Job),
    ClearCache(oneshot::Sender<usize>),
    Stats(oneshot::Sender<CacheStats>),
    /// Finish writing snapshots to disk, then stop.
    Shutdown(mpsc::Sender<()>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the engine's queue is full ({0} waiting)")]
    Full(usize),
    #[error("the engine has stopped")]
    Dead,
    /// The engine did not get to the command in time (it stays queued).
    #[error("the engine is busy: {0} did not run within {1} s; it stays queued and runs after the requests ahead of it")]
    Busy(&'static str, u64),
}

/// How long `DELETE /v1/cache` waits for the engine to reach it.
pub const CLEAR_WAIT: Duration = Duration::from_secs(10);

/// The exit status when MLX itself has failed (EX_SOFTWARE).
pub const EXIT_MLX_FAILED: i32 = 70;

/// A request takes over (rather than copies) a snapshot whose prompt it
/// continues but for at most this many final tokens (the boundary before
/// the answer re-tokenizes), and whose answer part it does not share is at
/// most [`TAKE_OVER_TAIL`] tokens long; see `Worker::lookup`.
pub const TAKE_OVER_SLACK: usize = 8;
pub const TAKE_OVER_TAIL: usize = 4096;

/// The text of a caught panic.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Whether MLX still computes: a small sum, evaluated and checked. After a
/// failed request this tells a bad request from a broken MLX.
fn mlx_works() -> Result<(), String> {
    #[cfg(test)]
    if tests::BREAK_MLX.load(Ordering::SeqCst) {
        return Err("a test marked MLX as broken".into());
    }
    let check = || -> Result<f32, crate::mlx::MlxError> {
        let a = mlx_rs::Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2]);
        let s = a.matmul(&a)?.sum(None)?;
        s.eval()?;
        Ok(s.item_exact::<f32>())
    };
    match catch_unwind(check) {
        Ok(Ok(v)) if v == 54.0 => Ok(()),
        Ok(Ok(v)) => Err(format!("a 2x2 matmul summed to {v}, not 54")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(p) => Err(panic_text(&*p)),
    }
}

/// The engine cannot go on (MLX is broken): say why and exit, so that a
/// supervisor restarts the process.
fn exit_mlx_failed(why: &str) -> ! {
    tracing::error!("the engine cannot go on ({why}); exiting with status {EXIT_MLX_FAILED} so that a supervisor restarts kvserve");
    eprintln!("kvserve: the engine cannot go on ({why}); exiting with status {EXIT_MLX_FAILED}");
    std::process::exit(EXIT_MLX_FAILED)
}

/// The handle the server holds.
pub struct Engine {
    tx: mpsc::SyncSender<Msg>,
    pub info: Arc<ModelInfo>,
    queued: Arc<AtomicUsize>,
    alive: Arc<AtomicBool>,
    stats: Arc<Mutex<CacheStats>>,
    queue: usize,
    /// Test hook: the next job panics after its first token.
    #[cfg(test)]
    inject_panic: Arc<AtomicBool>,
}

/// Marks the engine dead when its thread ends, however it ends.
struct AliveGuard(Arc<AtomicBool>);
impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
        // Jobs are caught one by one; a panic that still ends the thread
        // leaves a server that cannot serve: exit, so it is restarted.
        if std::thread::panicking() {
            exit_mlx_failed("the engine thread panicked outside a request");
        }
    }
}

/// A KV snapshot in the prefix cache: in memory, on disk, or both.
#[derive(Clone)]
struct Snapshot {
    layers: Option<Rc<Vec<LayerKv>>>,
    file: Option<PathBuf>,
    /// How many of its tokens were the request's prompt (the rest is the
    /// answer); 0 when unknown (read from disk).
    prompt_len: usize,
}

impl Cached for Snapshot {
    fn bytes(&self) -> usize {
        self.layers.as_ref().map_or(0, |l| l.iter().map(LayerKv::nbytes).sum())
    }
    fn demote(&self) -> Option<Self> {
        self.file.as_ref().map(|f| Snapshot { layers: None, file: Some(f.clone()), prompt_len: self.prompt_len })
    }
}

impl Engine {
    /// Start the engine thread and load the model there; returns when it is
    /// ready, or with the reason it could not start.
    pub fn start(cfg: EngineConfig) -> Result<Engine, String> {
        let (tx, rx) = mpsc::sync_channel::<Msg>(cfg.queue.max(1));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<Arc<ModelInfo>, String>>();
        let alive = Arc::new(AtomicBool::new(true));
        let queued = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(Mutex::new(CacheStats { budget_bytes: cfg.cache_bytes, ..Default::default() }));
        let (a, q, s, c) = (alive.clone(), queued.clone(), stats.clone(), cfg.clone());
        #[cfg(test)]
        let inject_panic = Arc::new(AtomicBool::new(false));
        #[cfg(test)]
        let inject = inject_panic.clone();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                let _guard = AliveGuard(a);
                let loaded = catch_unwind(AssertUnwindSafe(|| Worker::new(&c, s)))
                    .unwrap_or_else(|p| Err(format!("loading the model failed: {}", panic_text(&*p))));
                let mut worker = match loaded {
                    Ok((w, info)) => {
                        let _ = ready_tx.send(Ok(info));
                        w
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                #[cfg(test)]
                {
                    worker.inject_panic = inject;
                }
                loop {
                    // Snapshots go to disk while nothing waits; with none to
                    // write, the thread sleeps until the next message.
                    let next = if worker.unsaved.is_empty() {
                        rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
                    } else {
                        rx.recv_timeout(std::time::Duration::from_millis(20))
                    };
                    let msg = match next {
                        Ok(m) => m,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            let _ = worker.guarded("writing a snapshot", |w| w.persist_one());
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    };
                    // Saturating: a count that wrapped would read as a full queue.
                    let _ = q.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| Some(n.saturating_sub(1)));
                    match msg {
                        Msg::Generate(job) => {
                            let events = job.events.clone();
                            if let Err(why) = worker.guarded("a request", |w| w.run(job)) {
                                let _ = events.send(Event::Error(format!(
                                    "internal error: the engine failed on this request ({why}); the request was dropped and the server goes on"
                                )));
                            }
                        }
                        Msg::ClearCache(reply) => {
                            if let Ok(n) = worker.guarded("clearing the cache", |w| w.clear()) {
                                let _ = reply.send(n);
                            }
                        }
                        Msg::Stats(reply) => {
                            let _ = reply.send(worker.cache.stats());
                        }
                        Msg::Shutdown(done) => {
                            while worker.guarded("writing a snapshot", |w| w.persist_one()) == Ok(true) {}
                            if let Some(store) = &worker.store {
                                store.flush();
                            }
                            let _ = done.send(());
                            return;
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start the engine thread: {e}"))?;
        let info = ready_rx.recv().map_err(|_| "the engine thread stopped while loading".to_string())??;
        Ok(Engine {
            tx,
            info,
            queued,
            alive,
            stats,
            queue: cfg.queue.max(1),
            #[cfg(test)]
            inject_panic,
        })
    }

    /// Test hook: make the next job panic after its first token.
    #[cfg(test)]
    pub fn inject_panic_in_next_job(&self) {
        self.inject_panic.store(true, Ordering::SeqCst);
    }

    /// Queue a job; refused at once when the queue is full or the engine is gone.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        self.send(Msg::Generate(job))
    }

    fn send(&self, msg: Msg) -> Result<(), SubmitError> {
        if !self.is_alive() {
            return Err(SubmitError::Dead);
        }
        self.queued.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                match e {
                    mpsc::TrySendError::Full(_) => Err(SubmitError::Full(self.queue)),
                    mpsc::TrySendError::Disconnected(_) => Err(SubmitError::Dead),
                }
            }
        }
    }

    /// Drop every cached snapshot (memory and disk); returns how many.
    /// Waits at most [`CLEAR_WAIT`] for the engine to get to it.
    pub async fn clear_cache(&self) -> Result<usize, SubmitError> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::ClearCache(tx))?;
        match tokio::time::timeout(CLEAR_WAIT, rx).await {
            Ok(r) => r.map_err(|_| SubmitError::Dead),
            Err(_) => Err(SubmitError::Busy("clearing the cache", CLEAR_WAIT.as_secs())),
        }
    }

    /// Stop after the queued requests, with every snapshot file written.
    pub fn shutdown(&self) {
        let (tx, rx) = mpsc::channel();
        // A blocking send: waits for room in the queue. Counted like any
        // message, since the engine counts each one it takes off.
        self.queued.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(Msg::Shutdown(tx)).is_ok() {
            let _ = rx.recv();
        } else {
            let _ = self.queued.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| Some(n.saturating_sub(1)));
        }
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Requests waiting for the engine.
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// The cache's numbers as last published (after each lookup and request).
    pub fn cache_stats(&self) -> CacheStats {
        *self.stats.lock()
    }

    /// The cache's numbers once the engine is between requests (so they
    /// include the last request's snapshot); the published ones if that
    /// takes longer than `wait`.
    pub async fn cache_stats_settled(&self, wait: std::time::Duration) -> CacheStats {
        let (tx, rx) = oneshot::channel();
        if self.send(Msg::Stats(tx)).is_err() {
            return self.cache_stats();
        }
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(s)) => s,
            _ => self.cache_stats(),
        }
    }
}

struct Worker {
    model: Transformer,
    info: Arc<ModelInfo>,
    cache: PrefixCache<Snapshot>,
    store: Option<Store>,
    stats: Arc<Mutex<CacheStats>>,
    prefill_chunk: usize,
    /// Entries kept in memory and not yet written to disk (newest last).
    unsaved: Vec<crate::cache::prefix::EntryId>,
    /// Files of entries taken out of the index; deleted once a newer snapshot is on disk.
    obsolete: Vec<PathBuf>,
    /// What the running request holds (a pinned entry, the file of one taken
    /// out of the index): dropped if it fails.
    holding: (Option<crate::cache::prefix::EntryId>, Option<PathBuf>),
    /// Test hook: the next job panics after its first token.
    #[cfg(test)]
    inject_panic: Arc<AtomicBool>,
}

/// The weight, config and tokenizer files a model's KV state depends on.
fn model_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.ends_with(".safetensors") || name == "config.json" || name == "tokenizer.json" || name == "tokenizer_config.json"
        })
        .collect();
    files.sort();
    files
}

/// What [`Worker::lookup`] found.
struct Lookup {
    /// The KV state to compute the rest of the prompt on.
    live: Vec<LayerKv>,
    /// Prompt tokens it already holds.
    read: usize,
    /// The file of an entry taken out of the index, deleted once a newer snapshot is on disk.
    taken_file: Option<PathBuf>,
    /// A shared entry in use: pinned (never evicted) until the request ends.
    pinned: Option<crate::cache::prefix::EntryId>,
}

impl Worker {
    fn new(cfg: &EngineConfig, stats: Arc<Mutex<CacheStats>>) -> Result<(Worker, Arc<ModelInfo>), String> {
        let LoadedModel { model, tokenizer, template, eos_ids, path, name } =
            source::load(&cfg.model).map_err(|e| e.to_string())?;
        // Warm up (first-use costs out of the first request) and measure the
        // KV bytes per token.
        let mut kv = new_cache(model.num_layers());
        prefill(&model, &mut kv, &[tokenizer.eos_ids.first().copied().unwrap_or(0)], 1).map_err(|e| e.to_string())?;
        let kv_bytes_per_token = kv.iter().map(LayerKv::nbytes).sum::<usize>() / STEP as usize;
        let trained = model.config.context_length.max(1) as usize;
        let context = cfg.context_override.unwrap_or(trained);
        if context > trained {
            tracing::warn!("context set to {context} tokens; the model was trained on {trained}: answers past that may be poor");
        }
        let mut cache = PrefixCache::new(cfg.cache_bytes);
        let store = match &cfg.cache_dir {
            Some(dir) => {
                let fp = store::fingerprint(&model_files(&path), tokenizer.chat_template.as_deref());
                match Store::open(dir, fp) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::warn!("prompt cache kept in memory only: {e}");
                        None
                    }
                }
            }
            None => None,
        };
        if let Some(s) = &store {
            let (found, warnings) = store::scan(&s.dir, &s.fingerprint);
            for w in warnings {
                tracing::warn!("{w}");
            }
            let n = found.len();
            for f in found {
                cache.insert(&f.tokens, Snapshot { layers: None, file: Some(f.path), prompt_len: 0 });
            }
            // Files made redundant by longer ones stay on disk but are not indexed.
            cache.take_removed();
            tracing::info!("prompt cache: {n} snapshots found in {}", s.dir.display());
        }
        let info = Arc::new(ModelInfo {
            name,
            path,
            tokenizer,
            template,
            eos_ids,
            context,
            kv_bytes_per_token,
        });
        let w = Worker {
            model,
            info: info.clone(),
            cache,
            store,
            stats,
            prefill_chunk: cfg.prefill_chunk.max(1),
            unsaved: vec![],
            obsolete: vec![],
            holding: (None, None),
            #[cfg(test)]
            inject_panic: Arc::new(AtomicBool::new(false)),
        };
        w.publish();
        Ok((w, info))
    }

    fn publish(&self) {
        *self.stats.lock() = self.cache.stats();
    }

    /// Run `f`, catching a panic: the state the failed work held is dropped
    /// (see [`Worker::recover`]) and the panic's text comes back as `Err`.
    fn guarded<R>(&mut self, what: &str, f: impl FnOnce(&mut Worker) -> R) -> Result<R, String> {
        match catch_unwind(AssertUnwindSafe(|| f(self))) {
            Ok(r) => Ok(r),
            Err(p) => {
                let why = panic_text(&*p);
                tracing::error!("the engine failed on {what}: {why}; dropping what it held and going on");
                self.recover();
                Err(why)
            }
        }
    }

    /// After a failure: drop the cache entries the failed request held, check
    /// the index (cleared if broken), and check that MLX still computes
    /// (exit for a restart if not).
    fn recover(&mut self) {
        let (pinned, taken) = std::mem::take(&mut self.holding);
        if let Some(id) = pinned {
            self.cache.release(id);
            self.cache.remove(id);
        }
        if let Some(f) = taken {
            let _ = std::fs::remove_file(f);
        }
        if let Err(e) = self.cache.check() {
            tracing::error!("the prompt cache's index is inconsistent after the failure ({e}); clearing it");
            self.cache.clear();
        }
        self.forget_removed();
        if let Err(why) = mlx_works() {
            exit_mlx_failed(&why);
        }
        self.publish();
    }

    fn clear(&mut self) -> usize {
        let n = self.cache.clear();
        self.forget_removed();
        self.publish();
        n
    }

    /// Delete the files of snapshots the cache dropped.
    fn forget_removed(&mut self) {
        for s in self.cache.take_removed() {
            if let Some(f) = s.file {
                let _ = std::fs::remove_file(f);
            }
        }
    }

    /// Store a snapshot of `live` (holding `tokens`), on disk too when a
    /// cache folder is set; true if it was kept.
    fn keep(&mut self, tokens: &[u32], prompt_len: usize, live: &[LayerKv]) -> bool {
        let arrays: Vec<&mlx_rs::Array> = live.iter().flat_map(LayerKv::arrays).collect();
        if let Err(e) = mlx_rs::transforms::eval(arrays) {
            tracing::warn!("snapshot not kept: {e}");
            return false;
        }
        let layers: Vec<LayerKv> = live.iter().map(LayerKv::snapshot).collect();
        let bytes: usize = layers.iter().map(LayerKv::nbytes).sum();
        if bytes > self.cache.budget() {
            return false;
        }
        let id = self.cache.insert(tokens, Snapshot { layers: Some(Rc::new(layers)), file: None, prompt_len });
        self.forget_removed();
        if let (Some(id), Some(_)) = (id, &self.store) {
            self.unsaved.push(id);
        }
        id.is_some()
    }

    /// Write the newest snapshot not yet on disk (called when idle); then
    /// delete the files it supersedes. False when there was nothing to write.
    fn persist_one(&mut self) -> bool {
        let Some(store) = &self.store else { return false };
        while let Some(id) = self.unsaved.pop() {
            let (Some(tokens), Some(snap)) = (self.cache.tokens_of(id), self.cache.value(id).cloned()) else { continue };
            let Some(layers) = &snap.layers else { continue };
            match store.save(&tokens, layers) {
                Ok(path) => {
                    for old in self.obsolete.drain(..) {
                        if old != path {
                            let _ = std::fs::remove_file(old);
                        }
                    }
                    self.cache.replace(id, Snapshot { layers: snap.layers.clone(), file: Some(path), prompt_len: snap.prompt_len });
                    self.forget_removed();
                }
                Err(e) => tracing::warn!("snapshot not written to disk: {e}"),
            }
            return true;
        }
        false
    }

    /// The deepest usable snapshot for `prompt` as a live cache (see [`Lookup`]) and how many
    /// tokens it serves. A snapshot the prompt extends, or whose prompt it
    /// extends (the next turn of its conversation), is taken out of the index (this
    /// request's own snapshot will replace it), so the live state owns its
    /// buffers and MLX writes them in place; one that must be trimmed by
    /// more stays (it is another conversation's) and is copied on write.
    /// A snapshot that cannot be read from disk is dropped.
    fn lookup(&mut self, prompt: &[u32]) -> Lookup {
        loop {
            let Some(hit) = self.cache.fetch_nearest(prompt, prompt.len() - 1) else {
                return Lookup { live: new_cache(self.model.num_layers()), read: 0, taken_file: None, pinned: None };
            };
            let layers = match (&hit.value.layers, &hit.value.file, &self.store) {
                (Some(l), _, _) => l.clone(),
                (None, Some(f), Some(store)) => match store::load(f, self.model.num_layers(), hit.entry_len, &store.fingerprint) {
                    Ok(l) => {
                        let l = Rc::new(l);
                        if hit.usable < hit.entry_len {
                            self.cache.replace(hit.id, Snapshot { layers: Some(l.clone()), file: Some(f.clone()), prompt_len: hit.value.prompt_len });
                        }
                        l
                    }
                    Err(e) => {
                        tracing::warn!("ignoring a cached snapshot: {e}");
                        self.cache.release(hit.id);
                        self.cache.remove(hit.id);
                        self.forget_removed();
                        continue;
                    }
                },
                _ => {
                    self.cache.release(hit.id);
                    self.cache.remove(hit.id);
                    continue;
                }
            };
            let file = hit.value.file.clone();
            // The next turn of the snapshot's conversation is taken over too:
            // it continues the snapshot's prompt and differs only in the
            // answer (the template re-renders it, and its first tokens
            // re-tokenize differently). Keeping the old one would cost a full
            // copy of the cache on the first write and one more snapshot in
            // memory every turn, for an answer that costs little to
            // recompute if that exact request ever comes again. Another
            // conversation sharing only a prefix is copied.
            let p = hit.value.prompt_len;
            let owned = hit.usable == hit.entry_len
                || (p > 0 && hit.usable + TAKE_OVER_SLACK >= p && hit.entry_len.saturating_sub(hit.usable) <= TAKE_OVER_TAIL);
            let (id, usable) = (hit.id, hit.usable);
            drop(hit);
            let (mut taken_file, mut pinned) = (None, Some(id));
            if owned {
                // Out of the index; its file stays until this request's snapshot is written.
                self.cache.remove(id);
                self.cache.take_removed();
                taken_file = file;
                pinned = None;
            }
            let layers = match Rc::try_unwrap(layers) {
                Ok(l) => l,
                Err(shared) => shared.iter().map(LayerKv::snapshot).collect(),
            };
            // Only the tokens the index matched are this prompt's; the rest is another conversation's.
            let mut live = layers;
            for l in &mut live {
                let _ = l.trim_to(usable as i32);
            }
            debug_assert!(live.iter().all(|l| l.offset() as usize == usable));
            return Lookup { live, read: usable, taken_file, pinned };
        }
    }

    fn run(&mut self, job: Job) {
        let start = Instant::now();
        if let Err(e) = self.run_inner(&job, start) {
            let _ = job.events.send(Event::Error(e));
            // A request's error may be MLX's own failure.
            if let Err(why) = mlx_works() {
                exit_mlx_failed(&why);
            }
        }
        self.publish();
    }

    fn run_inner(&mut self, job: &Job, start: Instant) -> Result<(), String> {
        let prompt = &job.prompt;
        let n = prompt.len();
        if n == 0 {
            return Err("the prompt is empty".into());
        }
        if job.events.is_closed() {
            return Ok(());
        }
        let Lookup { mut live, read, taken_file, pinned } = self.lookup(prompt);
        self.holding = (pinned, taken_file.clone());
        tracing::debug!("lookup: {read} tokens from cache in {:.0} ms", start.elapsed().as_secs_f64() * 1e3);
        self.publish();
        let result = self.compute(job, &mut live, read, start);
        // One snapshot per request, whatever happened: every token boundary
        // in it (each breakpoint included) is served by trimming it.
        let held = live.first().map_or(0, |l| l.offset() as usize);
        let t_keep = Instant::now();
        let kept: &[u32] = match &result {
            Ok(tokens) if held > 0 && held <= tokens.len() => &tokens[..held],
            Ok(_) => &[],
            Err(_) => {
                // After an error only what was read is known to be good.
                for l in &mut live {
                    let _ = l.trim_to(read as i32);
                }
                &prompt[..read]
            }
        };
        if !kept.is_empty() {
            self.keep(kept, n.min(kept.len()), &live);
        }
        self.holding = (None, None);
        self.obsolete.extend(taken_file);
        if let Some(id) = pinned {
            self.cache.release(id);
            self.forget_removed();
        }
        tracing::info!(
            "snapshot of {held} tokens kept in {:.0} ms; {} snapshots, {:.0} MB; MLX holds {:.0} MB in arrays, {:.0} MB in its buffer cache",
            t_keep.elapsed().as_secs_f64() * 1e3,
            self.cache.len(),
            self.cache.bytes() as f64 / 1e6,
            crate::mlx::active_memory().unwrap_or(0) as f64 / 1e6,
            crate::mlx::cache_memory().unwrap_or(0) as f64 / 1e6,
        );
        result.map(|_| ())
    }

    /// Compute the prompt past `read` and generate; returns the tokens the
    /// live state holds (prompt, answer, end token).
    fn compute(&mut self, job: &Job, live: &mut [LayerKv], read: usize, start: Instant) -> Result<Vec<u32>, String> {
        let prompt = &job.prompt;
        let n = prompt.len();
        let planned_tokens = (n + job.opts.max_tokens).div_ceil(STEP as usize) * STEP as usize;
        let fits = |tokens: usize| tokens * self.info.kv_bytes_per_token <= self.cache.budget();
        let creation = if fits(planned_tokens) { n - read } else { 0 };
        let mut usage = PromptUsage { prompt: n, cache_read: read, cache_creation: creation, input: n - read - creation };
        if job.events.send(Event::Started(usage)).is_err() {
            return Ok(prompt[..read].to_vec());
        }
        // Room for the whole prompt at once (one copy instead of one per chunk).
        let cfg = &self.model.config;
        for l in live.iter_mut() {
            l.reserve(n as i32, cfg.num_kv_heads, cfg.head_dim).map_err(|e| e.to_string())?;
        }
        // The prompt but its last token, in chunks; a client that leaves stops it between chunks.
        for part in prompt[read..n - 1].chunks(self.prefill_chunk) {
            prefill(&self.model, live, part, self.prefill_chunk).map_err(|e| e.to_string())?;
            if job.events.is_closed() {
                return Ok(prompt.clone());
            }
        }
        let prefill_done = start.elapsed().as_secs_f64();
        let mut first_token: Option<f64> = None;
        let events = &job.events;
        #[cfg(test)]
        let inject = self.inject_panic.clone();
        let stats = generate(&self.model, &self.info.tokenizer, live, prompt, &job.opts, &mut |text| {
            #[cfg(test)]
            if inject.swap(false, Ordering::SeqCst) {
                panic!("injected fault: a test asked this job to panic");
            }
            if first_token.is_none() {
                first_token = Some(start.elapsed().as_secs_f64());
            }
            events.send(Event::Text(text.to_string())).is_ok()
        })
        .map_err(|e| e.to_string())?;
        let mut all = prompt.clone();
        all.extend(&stats.tokens);
        all.extend(stats.end_token);
        // The snapshot stored after this returns holds every prompt token.
        let held: usize = live.first().map_or(0, |l| l.offset() as usize);
        let bytes: usize = live.iter().map(LayerKv::nbytes).sum();
        let stored = held >= n && bytes <= self.cache.budget();
        usage.cache_creation = if stored { n - read } else { 0 };
        usage.input = n - read - usage.cache_creation;
        let done = Done {
            finish: stats.finish,
            usage,
            generated_tokens: stats.generated_tokens,
            ttft_secs: first_token.unwrap_or(prefill_done + stats.generation_secs),
            prompt_secs: prefill_done,
            generation_secs: stats.generation_secs,
        };
        tracing::info!(
            "prompt {} tokens ({} from cache, {} computed) in {:.2}s; first token at {:.2}s; {} tokens at {:.1} tok/s",
            n,
            read,
            n - read,
            prefill_done,
            done.ttft_secs,
            stats.generated_tokens,
            stats.generation_tps(),
        );
        let _ = job.events.send(Event::Done(done));
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test hook: [`mlx_works`] reports MLX as broken.
    pub(super) static BREAK_MLX: AtomicBool = AtomicBool::new(false);

    const CHILD: &str = "KVSERVE_TEST_BROKEN_MLX_CHILD";
    const NAME: &str = "engine::worker::tests::a_broken_mlx_after_a_failed_request_exits_with_status_70";

    /// A request fails (an injected panic) and MLX then fails its check: the
    /// process logs why and exits with status 70 for its supervisor. Run in a
    /// child process (this test binary, re-run on this one test), since the
    /// exit ends the process.
    #[test]
    fn a_broken_mlx_after_a_failed_request_exits_with_status_70() {
        if std::env::var_os(CHILD).is_some() {
            child();
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture", "--test-threads", "1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_MLX_FAILED), "{}\n{stderr}", String::from_utf8_lossy(&out.stdout));
        assert!(stderr.contains("a test marked MLX as broken") && stderr.contains("exiting with status 70"), "{stderr}");
    }

    fn child() -> ! {
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct");
        let engine = Engine::start(EngineConfig {
            model: model.to_string_lossy().into_owned(),
            cache_bytes: 1 << 28,
            cache_dir: None,
            queue: 4,
            prefill_chunk: 512,
            context_override: None,
        })
        .unwrap();
        let prompt = engine.info.tokenizer.encode("Name a colour.").unwrap();
        let (tx, mut rx) = tmpsc::unbounded_channel();
        let opts = GenerateOptions { max_tokens: 8, eos_ids: engine.info.eos_ids.clone(), ..Default::default() };
        BREAK_MLX.store(true, Ordering::SeqCst);
        engine.inject_panic_in_next_job();
        engine.submit(Job { prompt, breakpoints: vec![], opts, events: tx }).unwrap();
        // The engine exits the process while this waits; getting past it is a failure.
        while rx.blocking_recv().is_some() {}
        std::thread::sleep(Duration::from_secs(5));
        eprintln!("the process did not exit");
        std::process::exit(1)
    }
}
