//! The kernel thread pool: `num_threads() - 1` persistent workers plus the calling thread.
//!
//! A decode step issues ~40 matmuls and as many small ops, each worth tens of microseconds,
//! so dispatch latency matters more than scheduling features. Workers spin on an epoch
//! counter for a short while after each job (a hot dispatch costs well under a
//! microsecond) and only then park on a condvar, so an idle server does not burn a core.
//! Indices are handed out in small batches through an atomic counter: the caller takes
//! part, and if a worker is slow to wake (or its core is busy) the caller simply does more
//! of the work.
//!
//! One caller at a time: `parallel_for` holds a global lock for the duration of a job, so
//! callers on different threads queue up. A `parallel_for` issued from inside a job (on the
//! caller or on a worker) runs inline on that thread instead of deadlocking.

use std::any::Any;
use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking. Long enough to bridge the gaps between
/// the ops of a decode step and between steps (tens of microseconds), short enough that an
/// idle engine gives its cores back almost at once. Waking a parked worker costs a futex
/// wake-up (10–50 µs on a VM), which is what the spin avoids.
const SPIN: Duration = Duration::from_micros(300);

/// One `parallel_for` call. Lives on the caller's stack; workers reach it through
/// `Shared::job` only while they are counted in `Shared::active` (see `Pool::run`).
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    n: usize,
    /// Indices claimed per atomic increment (see `grain`).
    grain: usize,
    next: AtomicUsize,
    /// Set when `f` panicked anywhere: indices not yet started are skipped.
    stop: AtomicBool,
    /// The payload of the first panic on a worker, re-raised on the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

/// Indices per claim: about eight claims per thread. One atomic increment per index would
/// bounce the counter's cache line between cores for every row of a norm (~100 ns of
/// work each); eight claims per thread still balance uneven tasks such as attention over
/// sequences of different lengths.
fn grain(n: usize, threads: usize) -> usize {
    (n / (threads * 8)).max(1)
}

impl Job<'_> {
    fn run(&self) {
        loop {
            let start = self.next.fetch_add(self.grain, Ordering::Relaxed);
            if start >= self.n {
                return;
            }
            for i in start..self.n.min(start + self.grain) {
                if self.stop.load(Ordering::Relaxed) {
                    return;
                }
                (self.f)(i);
            }
        }
    }
}

struct Shared {
    /// The job being run, or null. The lifetime is erased: see the protocol in `Pool::run`.
    job: AtomicPtr<Job<'static>>,
    /// Bumped once per job (and on shutdown); workers wait for it to change.
    epoch: AtomicU64,
    /// Workers between "about to look at `job`" and "done with it".
    active: AtomicUsize,
    /// Workers parked (or about to park) on `cvar`.
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    lock: Mutex<()>,
    cvar: Condvar,
}

struct Pool {
    threads: usize,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

thread_local! {
    /// Set while this thread executes a job's closure, so nested calls run inline.
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

/// `None` until first use, so `set_num_threads` can still change the size.
static POOL: Mutex<Option<Pool>> = Mutex::new(None);
/// 0 means "use `available_parallelism`".
static REQUESTED: AtomicUsize = AtomicUsize::new(0);

fn lock_pool() -> MutexGuard<'static, Option<Pool>> {
    // A panicking job leaves the pool consistent (the unpublish guard runs during
    // unwinding, before the lock is released), so poisoning carries no information.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

fn configured_threads() -> usize {
    match REQUESTED.load(Ordering::Relaxed) {
        0 => {
            // Cached: `available_parallelism` reads cgroup files on Linux.
            static DEFAULT: OnceLock<usize> = OnceLock::new();
            *DEFAULT.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        }
        n => n,
    }
}

/// Threads the kernels use, the caller included. The pool is (re)built to this size on
/// the next `parallel_for`.
pub fn num_threads() -> usize {
    configured_threads()
}

/// Sets the kernel thread count (the caller included; 0 restores the default,
/// `available_parallelism`). Meant to be called once at start-up; calling it later makes
/// the next `parallel_for` rebuild the pool, which is safe but costs a join and a spawn.
pub fn set_num_threads(n: usize) {
    REQUESTED.store(n, Ordering::Relaxed);
}

/// Runs `f(i)` for every `i` in `0..n` on the kernel threads and returns when all are done.
/// Each index runs exactly once; the order and the thread are unspecified. A panic in `f`
/// (on any thread) is re-raised here, with its payload, once every running index has
/// finished; indices not yet started are then skipped.
pub fn parallel_for(n: usize, f: impl Fn(usize) + Sync) {
    if n == 0 {
        return;
    }
    if n == 1 || IN_JOB.with(Cell::get) {
        (0..n).for_each(f);
        return;
    }
    let threads = configured_threads();
    if threads == 1 {
        (0..n).for_each(f);
        return;
    }
    let mut guard = lock_pool();
    if guard.as_ref().is_some_and(|p| p.threads != threads) {
        *guard = None; // Drop joins the old workers.
    }
    guard.get_or_insert_with(|| Pool::new(threads)).run(n, &f);
}

impl Pool {
    fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            epoch: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            lock: Mutex::new(()),
            cvar: Condvar::new(),
        });
        let workers = (1..threads)
            .map(|i| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("switchyard-kernel-{i}"))
                    .spawn(move || worker_loop(&shared))
                    .expect("failed to spawn a kernel worker thread")
            })
            .collect();
        Pool {
            threads,
            shared,
            workers,
        }
    }

    /// Publishes `f` to the workers, runs indices on this thread too, then waits.
    ///
    /// Why the stack-allocated job is never touched after it is gone: a worker increments
    /// `active` *before* loading `job` and decrements it only after its last use of the
    /// job. The caller stores null into `job` and then waits for `active == 0`. All four
    /// accesses are SeqCst, so in their single total order either the worker's increment
    /// comes first (the caller sees it and waits) or the caller's null store does (the
    /// worker loads null or a later job and never sees this one). The wait runs in a drop
    /// guard, so it also happens when `f` panics on this thread.
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let job = Job {
            f,
            n,
            grain: grain(n, self.threads),
            next: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            panic: Mutex::new(None),
        };
        let shared = &*self.shared;
        // Lifetime erasure only; the protocol above bounds every dereference.
        let ptr = (&job as *const Job<'_>).cast_mut().cast::<Job<'static>>();
        shared.job.store(ptr, Ordering::SeqCst);
        shared.epoch.fetch_add(1, Ordering::SeqCst);
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            // Taking the lock orders this notify after any worker's "check epoch, then
            // wait" (done under the same lock), so no wake-up is lost.
            let _g = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.cvar.notify_all();
        }

        struct Unpublish<'a, 'j>(&'a Shared, &'a Job<'j>);
        impl Drop for Unpublish<'_, '_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    // `f` panicked here: let the workers stop at their current index.
                    self.1.stop.store(true, Ordering::Relaxed);
                }
                self.0.job.store(std::ptr::null_mut(), Ordering::SeqCst);
                let mut spins = 0u32;
                while self.0.active.load(Ordering::SeqCst) != 0 {
                    spins += 1;
                    if spins < 1 << 14 {
                        std::hint::spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
                }
            }
        }
        let unpublish = Unpublish(shared, &job);
        let _in_job = InJob::enter();
        job.run();
        drop(unpublish);
        let payload = job.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(payload) = payload {
            resume_unwind(payload);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.cvar.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Marks the current thread as running a job for as long as it lives.
struct InJob;

impl InJob {
    fn enter() -> InJob {
        IN_JOB.with(|c| c.set(true));
        InJob
    }
}

impl Drop for InJob {
    fn drop(&mut self) {
        IN_JOB.with(|c| c.set(false));
    }
}

fn worker_loop(shared: &Shared) {
    let _in_job = InJob::enter();
    // The epoch the pool was created with, not a fresh load: a job (or the shutdown) may
    // already have been published before this thread got to run, and must not be missed.
    let mut seen = 0;
    loop {
        seen = wait_for_epoch(shared, seen);
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        shared.active.fetch_add(1, Ordering::SeqCst);
        let ptr = shared.job.load(Ordering::SeqCst);
        if !ptr.is_null() {
            // SAFETY: we are counted in `active`, so the caller that published `ptr` has not
            // returned from `Pool::run` yet (see the protocol there) and the job is alive.
            let job = unsafe { &*ptr };
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| job.run())) {
                // Stop handing out indices; the caller re-raises once we are done.
                job.stop.store(true, Ordering::Relaxed);
                let mut slot = job.panic.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(payload);
            }
        }
        // Release: the job's writes happen-before the caller's return.
        shared.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Returns the new epoch once it differs from `seen`: spin first, then park.
fn wait_for_epoch(shared: &Shared, seen: u64) -> u64 {
    let start = Instant::now();
    loop {
        for _ in 0..64 {
            let e = shared.epoch.load(Ordering::Acquire);
            if e != seen {
                return e;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() > SPIN {
            break;
        }
    }
    let mut guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
    shared.sleepers.fetch_add(1, Ordering::SeqCst);
    let mut e = shared.epoch.load(Ordering::SeqCst);
    while e == seen {
        guard = shared.cvar.wait(guard).unwrap_or_else(|e| e.into_inner());
        e = shared.epoch.load(Ordering::SeqCst);
    }
    shared.sleepers.fetch_sub(1, Ordering::SeqCst);
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_index_runs_exactly_once() {
        for n in [0, 1, 2, 3, 7, 64, 1000, 4097] {
            let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
            parallel_for(n, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "n = {n}"
            );
        }
    }

    #[test]
    fn many_back_to_back_jobs_and_parked_workers() {
        let total = AtomicUsize::new(0);
        for round in 0..2000 {
            parallel_for(5, |i| {
                total.fetch_add(i, Ordering::Relaxed);
            });
            if round % 500 == 0 {
                // Long enough for the workers to park, exercising the condvar wake-up.
                std::thread::sleep(SPIN * 4);
            }
        }
        assert_eq!(total.load(Ordering::Relaxed), 2000 * 10);
    }

    #[test]
    fn rebuilding_the_pool_loses_no_job() {
        // A fresh pool is often dropped before its workers have started: they must still
        // see the shutdown (this once deadlocked).
        let hits = AtomicUsize::new(0);
        for round in 0..300 {
            set_num_threads(2 + round % 2);
            parallel_for(4, |_| {
                hits.fetch_add(1, Ordering::Relaxed);
            });
        }
        set_num_threads(0);
        assert_eq!(hits.load(Ordering::Relaxed), 1200);
    }

    #[test]
    fn nested_calls_run_inline() {
        let hits = AtomicUsize::new(0);
        parallel_for(4, |_| {
            parallel_for(3, |_| {
                hits.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(hits.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn concurrent_callers_are_serialized() {
        let hits = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..200 {
                        parallel_for(8, |_| {
                            hits.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(hits.load(Ordering::Relaxed), 3 * 200 * 8);
    }

    #[test]
    fn worker_panic_is_reraised_and_pool_survives() {
        // Index 0 usually runs on the caller, the others on either thread.
        for bad in [0, 1, 40, 63] {
            let r = catch_unwind(|| {
                parallel_for(64, |i| {
                    if i == bad {
                        panic!("boom");
                    }
                })
            });
            let msg = r.expect_err("the panic must reach the caller");
            assert_eq!(msg.downcast_ref::<&str>(), Some(&"boom"));
        }
        let hits = AtomicUsize::new(0);
        parallel_for(16, |_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 16);
    }
}
