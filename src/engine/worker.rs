//! The engine thread: the one thread that owns MLX, the model and the prefix
//! cache, running the [`Scheduler`]'s steps. Requests reach it through a
//! channel, each with its own event channel; start-up failure comes back on
//! a ready channel; if the thread dies, submissions fail at once (never a
//! hang).
//!
//! A step that panics is caught: its requests get an error, the cache
//! entries they held are dropped, and the engine goes on. Only MLX itself
//! failing is beyond repair; then the process logs why and exits non-zero
//! so that its supervisor restarts it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;

pub use super::scheduler::Load;
use super::scheduler::Scheduler;
use super::types::{Job, ModelInfo};
use crate::cache::prefix::CacheStats;

pub use super::policy::{TAKE_OVER_SLACK, TAKE_OVER_TAIL};

/// How the engine is set up.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// A model directory, GGUF file, or Hugging Face repo id.
    pub model: String,
    /// The prefix cache's memory budget in bytes.
    pub cache_bytes: usize,
    /// Where snapshots persist across restarts (none: memory only).
    pub cache_dir: Option<PathBuf>,
    /// How that folder is used: per model, and its disk bound.
    pub cache_disk: CacheDisk,
    /// Requests that may wait for the engine before new ones are refused.
    pub queue: usize,
    /// The most tokens in one prefill chunk.
    pub prefill_chunk: usize,
    /// Requests computed at once (the rest wait in the queue).
    pub parallel: usize,
    /// Keep snapshots quantized to this many bits (4 or 8; none: f16).
    pub kv_bits: Option<u8>,
    /// Use this context length instead of the model's own (beyond what the
    /// model was trained on, quality drops; said at start-up).
    pub context_override: Option<usize>,
    /// Lead a pipeline over an MLX ring: this process is rank 0 and holds
    /// the first layers; the other ranks run `kvserve serve` as followers.
    pub pipeline: Option<PipelineConfig>,
}

/// Rank 0's part of `kvserve serve --hostfile`.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// MLX's ring hostfile (every rank is started with the same one).
    pub hostfile: PathBuf,
    /// How long to wait for every rank to join.
    pub join_timeout: Duration,
    /// By layers or by heads (none: by layers).
    pub split: Option<crate::pipeline::Split>,
    /// The longest the other ranks may take to answer a step before the
    /// group counts as lost.
    pub step_timeout: Duration,
}

/// How the snapshot folder is used.
#[derive(Clone, Debug, Default)]
pub struct CacheDisk {
    /// `cache_dir` is a root (the per-user one, `--cache-dir auto`): this
    /// model's snapshots go to a folder under it named by its fingerprint.
    pub per_model: bool,
    /// Most bytes of snapshot files under the folder (or the root); none:
    /// 10% of the free space there, at most 50 GB.
    pub bound_bytes: Option<u64>,
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

enum Msg {
    Generate(Job),
    ClearCache(oneshot::Sender<usize>),
    /// Finish the requests taken, write snapshots to disk, then stop.
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
    crate::mlx::exit(EXIT_MLX_FAILED)
}

/// A pipeline lost a rank: the requests it was computing got their error
/// (503 from the server, as the engine now counts as stopped); give the
/// server a moment to send those answers, then exit non-zero, which ends
/// the other ranks too (their links close), so a supervisor restarts the group.
fn exit_rank_lost() -> ! {
    let why = crate::pipeline::why_broken();
    tracing::error!("{why}");
    eprintln!("kvserve: {why}");
    std::thread::sleep(Duration::from_millis(1500));
    crate::mlx::exit(crate::pipeline::EXIT_RANK_LOST)
}

/// The handle the server holds.
pub struct Engine {
    tx: mpsc::Sender<Msg>,
    pub info: Arc<ModelInfo>,
    /// Requests submitted and not yet running.
    queued: Arc<AtomicUsize>,
    alive: Arc<AtomicBool>,
    stats: Arc<Mutex<CacheStats>>,
    queue: usize,
    parallel: usize,
    /// What the engine is doing (published after every step).
    pub load: Arc<Load>,
    /// Test hook: the next job panics at its first text.
    #[cfg(test)]
    inject_panic: Arc<AtomicBool>,
}

/// Marks the engine dead when its thread ends, however it ends.
struct AliveGuard(Arc<AtomicBool>);
impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
        // Steps are caught one by one; a panic that still ends the thread
        // leaves a server that cannot serve: exit, so it is restarted.
        if std::thread::panicking() {
            exit_mlx_failed("the engine thread panicked outside a request");
        }
    }
}

/// Run `f` on the scheduler, catching a panic: every running request is
/// dropped with an error (with the cache entries it held), MLX is checked,
/// and the panic's text comes back as `Err`.
fn guarded<R>(s: &mut Scheduler, what: &str, f: impl FnOnce(&mut Scheduler) -> R) -> Result<R, String> {
    match catch_unwind(AssertUnwindSafe(|| f(s))) {
        Ok(r) => Ok(r),
        Err(p) => {
            let why = panic_text(&*p);
            tracing::error!("the engine failed on {what}: {why}; dropping what it held and going on");
            s.drop_running(&why);
            if let Err(why) = mlx_works() {
                exit_mlx_failed(&why);
            }
            Err(why)
        }
    }
}

/// The engine thread's loop: take messages (waiting for one only when
/// there is nothing to compute), run a step, and write snapshots to disk
/// while idle.
fn run(rx: mpsc::Receiver<Msg>, mut s: Scheduler) {
    let mut shutdown: Option<mpsc::Sender<()>> = None;
    // The published numbers lag the disk writer until it is done.
    let mut stale = false;
    loop {
        if s.idle() {
            if let Some(done) = shutdown.take() {
                let _ = guarded(&mut s, "writing the snapshots", |s| s.policy.flush());
                s.stop_followers();
                // Free every MLX array (the model, the cache) before the
                // caller may return from main: MLX's allocator is a static
                // that exit tears down, and freeing into it while it is torn
                // down corrupted the heap (1 shutdown in ~15).
                drop(s);
                let _ = done.send(());
                return;
            }
            // Snapshots go to disk while nothing waits; with none to
            // write, the thread sleeps until the next message.
            let busy = s.policy.disk_busy();
            if !busy && stale {
                s.policy.publish();
                stale = false;
            }
            let next = if busy { rx.recv_timeout(Duration::from_millis(20)) } else { rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected) };
            match next {
                Ok(m) => handle(&mut s, m, &mut shutdown),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if s.policy.has_unsaved() {
                        let _ = guarded(&mut s, "writing a snapshot", |s| s.policy.persist_one());
                        // The other ranks of a pipeline write their shares now.
                        s.flush_remote();
                    }
                    s.policy.publish();
                    stale = true;
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = guarded(&mut s, "writing the snapshots", |s| s.policy.flush());
                    s.stop_followers();
                    return;
                }
            }
        }
        while let Ok(m) = rx.try_recv() {
            handle(&mut s, m, &mut shutdown);
        }
        if !s.idle() {
            let stepped = guarded(&mut s, "a step", Scheduler::step);
            // A step abandoned half-way (a panic) leaves the other ranks of
            // a group mid-step: the group cannot go on.
            if stepped.is_err() {
                crate::pipeline::abandon_step();
            }
            if crate::pipeline::broken() {
                exit_rank_lost();
            }
            if let Ok(Err(why)) = stepped {
                // A step's error may be MLX's own failure.
                tracing::warn!("a step failed: {why}");
                if crate::pipeline::broken() {
                    exit_rank_lost();
                }
                if let Err(why) = mlx_works() {
                    exit_mlx_failed(&why);
                }
            }
        }
        s.flush_remote();
        if crate::pipeline::broken() {
            exit_rank_lost();
        }
    }
}

fn handle(s: &mut Scheduler, msg: Msg, shutdown: &mut Option<mpsc::Sender<()>>) {
    match msg {
        Msg::Generate(job) => s.submit(job),
        Msg::ClearCache(reply) => {
            if let Ok(n) = guarded(s, "clearing the cache", |s| s.policy.clear()) {
                let _ = reply.send(n);
            }
        }
        Msg::Shutdown(done) => *shutdown = Some(done),
    }
}

impl Engine {
    /// Start the engine thread and load the model there; returns when it is
    /// ready, or with the reason it could not start.
    pub fn start(cfg: EngineConfig) -> Result<Engine, String> {
        let (tx, rx) = mpsc::channel::<Msg>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(Arc<ModelInfo>, Arc<AtomicBool>), String>>();
        let alive = Arc::new(AtomicBool::new(true));
        let queued = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(Mutex::new(CacheStats { budget_bytes: cfg.cache_bytes, ..Default::default() }));
        let load = Arc::new(Load::default());
        let (a, q, st, c, l) = (alive.clone(), queued.clone(), stats.clone(), cfg.clone(), load.clone());
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                let _guard = AliveGuard(a);
                let loaded = catch_unwind(AssertUnwindSafe(|| Scheduler::new(&c, st, q, l)))
                    .unwrap_or_else(|p| Err(format!("loading the model failed: {}", panic_text(&*p))));
                match loaded {
                    Ok((s, info)) => {
                        let _ = ready_tx.send(Ok((info, s.inject_panic.clone())));
                        run(rx, s);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| format!("cannot start the engine thread: {e}"))?;
        #[allow(unused_variables)]
        let (info, inject_panic) = ready_rx.recv().map_err(|_| "the engine thread stopped while loading".to_string())??;
        Ok(Engine {
            tx,
            info,
            queued,
            alive,
            stats,
            queue: cfg.queue.max(1),
            parallel: cfg.parallel.max(1),
            load,
            #[cfg(test)]
            inject_panic,
        })
    }

    /// Test hook: make the next job panic at its first text.
    #[cfg(test)]
    pub fn inject_panic_in_next_job(&self) {
        self.inject_panic.store(true, Ordering::SeqCst);
    }

    /// Queue a job; refused at once when `queue` requests already wait
    /// beyond the places free to run (`parallel` less those running), or
    /// the engine is gone.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        if !self.is_alive() {
            return Err(SubmitError::Dead);
        }
        let free = self.parallel.saturating_sub(self.load.running.load(Ordering::SeqCst));
        let limit = self.queue + free;
        if self.queued.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| (q < limit).then_some(q + 1)).is_err() {
            return Err(SubmitError::Full(self.queue));
        }
        self.tx.send(Msg::Generate(job)).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Dead
        })
    }

    fn send(&self, msg: Msg) -> Result<(), SubmitError> {
        if !self.is_alive() {
            return Err(SubmitError::Dead);
        }
        self.tx.send(msg).map_err(|_| SubmitError::Dead)
    }

    /// Drop every cached snapshot (memory and disk); returns how many.
    /// Waits at most [`CLEAR_WAIT`] for the engine to get to it (between
    /// two steps).
    pub async fn clear_cache(&self) -> Result<usize, SubmitError> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::ClearCache(tx))?;
        match tokio::time::timeout(CLEAR_WAIT, rx).await {
            Ok(r) => r.map_err(|_| SubmitError::Dead),
            Err(_) => Err(SubmitError::Busy("clearing the cache", CLEAR_WAIT.as_secs())),
        }
    }

    /// Stop after the requests already submitted, with every snapshot file written.
    pub fn shutdown(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Msg::Shutdown(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// The engine computes (its thread runs, and a pipeline it leads has every rank).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst) && !crate::pipeline::broken()
    }

    /// Requests waiting for the engine (submitted, not yet running).
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// The cache's numbers, as the engine last published them (after each
    /// lookup, and before each request's `Done`, so they include its
    /// snapshot); never waits for the engine.
    pub fn cache_stats(&self) -> CacheStats {
        *self.stats.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::generate::GenerateOptions;
    use std::path::Path;
    use tokio::sync::mpsc as tmpsc;

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
            cache_disk: Default::default(),
            queue: 4,
            prefill_chunk: 512,
            parallel: 4,
            kv_bits: None,
            context_override: None,
            pipeline: None,
        })
        .unwrap();
        let prompt = engine.info.tokenizer.encode("Name a colour.").unwrap();
        let (tx, mut rx) = tmpsc::unbounded_channel();
        let opts = GenerateOptions { max_tokens: 8, eos_ids: engine.info.eos_ids.clone(), ..Default::default() };
        BREAK_MLX.store(true, Ordering::SeqCst);
        engine.inject_panic_in_next_job();
        engine.submit(Job { prompt, opts, events: tx, cache_points: vec![] }).unwrap();
        // The engine exits the process while this waits; getting past it is a failure.
        while rx.blocking_recv().is_some() {}
        std::thread::sleep(Duration::from_secs(5));
        eprintln!("the process did not exit");
        std::process::exit(1)
    }
}
