//! Long-lived threads for the ranks of a tensor-parallel group after the first, so that a
//! step does not start and join threads (tens of microseconds each, and a fresh thread must
//! bind the GPU context again) when the step itself may take a millisecond.
//!
//! A step hands every worker a borrowed task and runs rank 0 on the calling thread, then
//! waits for the workers before it returns, also when rank 0 panics: that wait is what
//! makes lending a borrowed task to another thread sound, as in `std::thread::scope`.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

/// A task borrowed for one step, its lifetime erased: valid until the worker reports back.
struct Task(*const (dyn Fn(usize) + Sync));

// SAFETY: the task is `Sync`, so calling it from another thread is allowed; the pointer
// stays valid until every worker has reported (see `RankPool::run`).
unsafe impl Send for Task {}

type Outcome = Result<(), Box<dyn Any + Send>>;

struct Worker {
    tasks: SyncSender<Task>,
    done: Receiver<Outcome>,
    thread: Option<JoinHandle<()>>,
}

/// One thread per rank `1..world`; rank 0 runs on the caller's thread.
pub(crate) struct RankPool {
    workers: Vec<Worker>,
}

impl RankPool {
    /// Threads inherit the creating thread's CPU affinity (a pinned loader gives its compute
    /// CPUs to the ranks).
    pub(crate) fn new(world: usize) -> Self {
        let workers = (1..world.max(1))
            .map(|rank| {
                let (tasks, task_rx) = sync_channel::<Task>(1);
                let (done_tx, done) = sync_channel::<Outcome>(1);
                let thread = std::thread::Builder::new()
                    .name(format!("tp-rank-{rank}"))
                    .spawn(move || {
                        for Task(task) in task_rx {
                            // SAFETY: `run` keeps the task alive until this send arrives.
                            let task = unsafe { &*task };
                            let outcome = catch_unwind(AssertUnwindSafe(|| task(rank)));
                            if done_tx.send(outcome).is_err() {
                                break;
                            }
                        }
                    })
                    .expect("spawning a tensor-parallel rank thread");
                Worker {
                    tasks,
                    done,
                    thread: Some(thread),
                }
            })
            .collect();
        RankPool { workers }
    }

    /// Runs `task(rank)` for every rank at once, rank 0 on this thread, and returns rank
    /// 0's result once every rank has finished. A panic on any rank is raised here after
    /// all of them have stopped.
    pub(crate) fn run<T>(&self, task: &(dyn Fn(usize) -> T + Sync)) -> T {
        let others = |rank: usize| drop(task(rank));
        let others: &(dyn Fn(usize) + Sync) = &others;
        // SAFETY: only the pointer's lifetime is erased. `Wait` below receives every
        // started worker's report before this frame (and `others`) goes away, on return and
        // on unwind alike, and a worker touches the task only before its report.
        let erased: *const (dyn Fn(usize) + Sync + 'static) = unsafe {
            std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const (dyn Fn(usize) + Sync)>(
                others,
            )
        };
        let mut wait = Wait {
            workers: &self.workers,
            started: 0,
            panic: None,
        };
        for w in &self.workers {
            w.tasks
                .send(Task(erased))
                .expect("a tensor-parallel rank thread is gone");
            wait.started += 1;
        }
        let first = task(0);
        wait.finish();
        first
    }
}

/// Collects the started workers' reports, in `finish` or when dropped during an unwind.
struct Wait<'a> {
    workers: &'a [Worker],
    started: usize,
    panic: Option<Box<dyn Any + Send>>,
}

impl Wait<'_> {
    fn collect(&mut self) {
        for w in &self.workers[..self.started] {
            match w.done.recv() {
                Ok(Ok(())) => {}
                Ok(Err(p)) => {
                    self.panic.get_or_insert(p);
                }
                // The thread died without reporting; it no longer holds the task.
                Err(_) => {}
            }
        }
        self.started = 0;
    }

    fn finish(mut self) {
        self.collect();
        if let Some(p) = self.panic.take() {
            resume_unwind(p);
        }
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        self.collect();
    }
}

impl Drop for RankPool {
    fn drop(&mut self) {
        for w in &mut self.workers {
            // Closing the task channel ends the worker's loop.
            let (closed, _) = sync_channel(1);
            drop(std::mem::replace(&mut w.tasks, closed));
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[test]
    fn every_rank_runs_once_per_step_on_its_own_thread() {
        let pool = RankPool::new(4);
        let seen = Mutex::new(Vec::new());
        for step in 0..3 {
            let out = pool.run(&|rank| {
                seen.lock()
                    .unwrap()
                    .push((step, rank, std::thread::current().id()));
                rank * 10 + step
            });
            assert_eq!(out, step, "rank 0's result is returned");
        }
        let seen = seen.into_inner().unwrap();
        assert_eq!(seen.len(), 12);
        for step in 0..3 {
            let mut ranks: Vec<usize> = seen.iter().filter(|s| s.0 == step).map(|s| s.1).collect();
            ranks.sort();
            assert_eq!(ranks, vec![0, 1, 2, 3]);
        }
        // Rank 0 runs on the caller; each other rank keeps one thread across steps.
        let me = std::thread::current().id();
        for rank in 0..4 {
            let threads: std::collections::HashSet<_> =
                seen.iter().filter(|s| s.1 == rank).map(|s| s.2).collect();
            assert_eq!(threads.len(), 1, "rank {rank} moved threads");
            assert_eq!(threads.contains(&me), rank == 0);
        }
    }

    #[test]
    fn ranks_run_at_the_same_time() {
        // Each rank waits for all the others: this finishes only if they run concurrently.
        let pool = RankPool::new(3);
        let arrived = AtomicUsize::new(0);
        pool.run(&|_| {
            arrived.fetch_add(1, Ordering::SeqCst);
            while arrived.load(Ordering::SeqCst) < 3 {
                std::hint::spin_loop();
            }
        });
        assert_eq!(arrived.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_worker_panic_reaches_the_caller_after_every_rank_stopped() {
        let pool = RankPool::new(3);
        let finished = AtomicUsize::new(0);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|rank| {
                if rank == 2 {
                    panic!("rank 2 fails");
                }
                finished.fetch_add(1, Ordering::SeqCst);
            })
        }));
        let msg = r.expect_err("the panic is raised on the caller");
        assert_eq!(msg.downcast_ref::<&str>(), Some(&"rank 2 fails"));
        assert_eq!(finished.load(Ordering::SeqCst), 2);
        // The pool still works after a failed step.
        assert_eq!(pool.run(&|rank| rank), 0);
    }

    #[test]
    fn a_world_of_one_runs_on_the_caller_alone() {
        let pool = RankPool::new(1);
        assert!(pool.workers.is_empty());
        assert_eq!(pool.run(&|rank| rank + 7), 7);
    }
}
