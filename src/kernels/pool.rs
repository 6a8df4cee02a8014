//! A small persistent thread pool for splitting one product across cores.
//!
//! Starting scoped threads costs ~60 us here, more than a decode-sized
//! product takes (5-45 us), so each product would run on one core. These
//! workers instead wait for the next job spinning for a short while (products
//! of one decode step come microseconds apart), then sleep on a condvar.
//!
//! The one `unsafe` here reads the borrowed job through a lifetime-erased
//! pointer: `run` closes the job and waits until no worker is inside it
//! before returning.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
const SPIN: Duration = Duration::from_micros(200);

type Task<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped once per job.
    epoch: AtomicUsize,
    /// The epoch of the job workers may join now; 0 when none is open.
    open: AtomicUsize,
    /// The current job: points at the caller's `Task`; see `run`.
    task: AtomicPtr<Task<'static>>,
    /// Chunks of the current job: the next unclaimed one, and how many.
    next: AtomicUsize,
    chunks: AtomicUsize,
    /// Workers inside the current job (between joining and leaving it).
    active: AtomicUsize,
    /// A worker's chunk panicked.
    panicked: AtomicBool,
    /// Workers waiting on `wake`.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

/// Persistent workers that help the caller run a job's chunks. Chunks are
/// claimed dynamically, so a worker that is descheduled (2 cores, shared with
/// MLX, the server and other processes) only means the caller runs more of
/// them itself; the caller never waits for a worker that has not started.
pub(crate) struct Pool {
    shared: Arc<Shared>,
    workers: usize,
    /// One job at a time; a second concurrent caller runs alone instead of waiting.
    busy: Mutex<()>,
}

impl Pool {
    /// The process-wide pool: one worker per CPU beyond the caller's, at most `max - 1`.
    pub(crate) fn global(max: usize) -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            Pool::new(cpus.clamp(1, max) - 1)
        })
    }

    fn new(workers: usize) -> Pool {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            task: AtomicPtr::new(std::ptr::null_mut()),
            next: AtomicUsize::new(0),
            chunks: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut started = 0;
        for i in 0..workers {
            let shared = shared.clone();
            let spawned = std::thread::Builder::new().name(format!("kvserve-qmv-{i}")).spawn(move || worker(&shared));
            if spawned.is_err() {
                break;
            }
            started += 1;
        }
        Pool { shared, workers: started, busy: Mutex::new(()) }
    }

    /// Threads that run a job: the workers and the caller.
    pub(crate) fn threads(&self) -> usize {
        self.workers + 1
    }

    /// `f(i, &mut parts[i])` for every part: on the pool when there are
    /// several parts and workers, else (or when another caller holds the
    /// pool) one after another on this thread.
    pub(crate) fn each<T: Send>(&self, parts: Vec<T>, f: &(dyn Fn(usize, &mut T) + Sync)) {
        let parts: Vec<std::sync::Mutex<T>> = parts.into_iter().map(std::sync::Mutex::new).collect();
        let run = |p: usize| f(p, &mut parts[p].lock().unwrap_or_else(|e| e.into_inner()));
        if !(parts.len() > 1 && self.threads() > 1 && self.run(parts.len(), &run)) {
            (0..parts.len()).for_each(run);
        }
    }

    /// Runs `f(0) .. f(chunks - 1)`, each once, on this thread and whichever
    /// workers join, and returns when all are done. Returns false without
    /// running anything if another caller is using the pool.
    pub(crate) fn run(&self, chunks: usize, f: Task<'_>) -> bool {
        let _busy = match self.busy.try_lock() {
            Ok(g) => g,
            // A job that panicked earlier left nothing half-done behind.
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        let sh = &*self.shared;
        // Never 0 (which means "no job open"): a usize does not wrap here.
        let epoch = sh.epoch.fetch_add(1, SeqCst) + 1;
        sh.next.store(0, SeqCst);
        sh.chunks.store(chunks, SeqCst);
        // The lifetime of `f` is erased here. Workers read it only while
        // `open` holds this epoch and they are counted in `active`; below,
        // the job is closed and this function waits for `active` to drain
        // before returning, so `f` outlives every use.
        let task: *const Task<'_> = &f;
        sh.task.store(task as *mut Task<'static>, SeqCst);
        sh.open.store(epoch, SeqCst);
        if sh.sleepers.load(SeqCst) > 0 {
            let _g = sh.lock.lock().unwrap_or_else(|e| e.into_inner());
            sh.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| claim_and_run(sh, f)));
        sh.open.store(0, SeqCst);
        let mut spins = 0u32;
        while sh.active.load(SeqCst) != 0 {
            spins = spins.wrapping_add(1);
            if spins % 1024 == 0 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        assert!(!sh.panicked.swap(false, SeqCst), "a qmv pool worker panicked");
        true
    }
}

/// Claims chunks of the current job until none is left.
fn claim_and_run(sh: &Shared, f: Task<'_>) {
    let chunks = sh.chunks.load(SeqCst);
    loop {
        let c = sh.next.fetch_add(1, SeqCst);
        if c >= chunks {
            return;
        }
        f(c);
    }
}

fn worker(sh: &Shared) {
    let mut seen = 0;
    loop {
        // Wait for a job newer than the last one seen: spin, then sleep.
        let start = Instant::now();
        let mut spins = 0u32;
        let job = loop {
            let open = sh.open.load(SeqCst);
            if open != 0 && open != seen {
                break open;
            }
            spins = spins.wrapping_add(1);
            if spins % 256 == 0 && start.elapsed() > SPIN {
                let mut g = sh.lock.lock().unwrap_or_else(|e| e.into_inner());
                sh.sleepers.fetch_add(1, SeqCst);
                loop {
                    let open = sh.open.load(SeqCst);
                    if open != 0 && open != seen {
                        break;
                    }
                    g = sh.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                sh.sleepers.fetch_sub(1, SeqCst);
                continue;
            }
            std::hint::spin_loop();
        };
        seen = job;
        sh.active.fetch_add(1, SeqCst);
        // Joined: the job is still open only if the caller has not yet closed
        // it, and then the caller waits for this worker to leave.
        if sh.open.load(SeqCst) == job {
            // SAFETY: the job is open and this worker is counted in `active`,
            // so the caller's `f` behind `task` stays alive until the
            // decrement below (see `Pool::run`).
            let f: Task<'_> = unsafe { *sh.task.load(SeqCst) };
            if catch_unwind(AssertUnwindSafe(|| claim_and_run(sh, f))).is_err() {
                sh.panicked.store(true, SeqCst);
            }
        }
        sh.active.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_per_job() {
        let pool = Pool::new(3);
        assert_eq!(pool.threads(), 4);
        for round in 0..2000 {
            let chunks = 1 + round % 13;
            let hits: Vec<AtomicUsize> = (0..chunks).map(|_| AtomicUsize::new(0)).collect();
            assert!(pool.run(chunks, &|c| {
                hits[c].fetch_add(round + 1, Relaxed);
            }));
            assert!(hits.iter().all(|h| h.load(Relaxed) == round + 1), "round {round}");
            if round % 500 == 0 {
                // Let the workers fall asleep, then wake them.
                std::thread::sleep(SPIN * 3);
            }
        }
    }

    #[test]
    fn worker_panic_reaches_the_caller_and_the_pool_survives() {
        let pool = Pool::new(1);
        let r = catch_unwind(AssertUnwindSafe(|| pool.run(4, &|c| assert!(c != 1, "chunk 1 fails"))));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        assert!(pool.run(5, &|_| {
            n.fetch_add(1, Relaxed);
        }));
        assert_eq!(n.load(Relaxed), 5);
    }
}
