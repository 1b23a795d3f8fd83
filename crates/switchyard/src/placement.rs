//! Where `serve`'s threads run: the CPU engine's compute threads on cores of their own, the
//! HTTP workers on the others, when the machine has enough cores for both.
//!
//! Why: a streamed token crosses from the engine thread to an HTTP worker. When both may
//! run on any core, the kernel often wakes the worker on the engine's core; the worker
//! preempts the engine there, and while it then admits a few new requests (a few
//! milliseconds of parsing and routing), the engine waits on that core's run queue, even
//! with the other core idle: the scheduler does not move a task that ran a moment ago
//! (cache-hot). Every stream then sees one gap that long. On the 2-core benchmark VM,
//! `perf sched` showed exactly this (the engine runnable for 4.1 ms behind the worker, the
//! other core idle), and splitting the cores took the server-side token wait p99 from
//! 2.5–5 ms to 0.5–1 ms (docs/benchmarks.md, Frontend, "Fifth look").
//!
//! Threads inherit the creating thread's affinity on Linux, so the plan needs only two
//! calls: the runtime's workers pin themselves as they start, and the loader pins itself
//! to the compute cores while it starts the engine threads (whose kernel pool threads are
//! created from them or from the loader), then returns to the HTTP cores.

/// `serve --cpu-affinity`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuAffinity {
    /// Split the cores when the compute threads and the HTTP workers fit on separate
    /// ones; otherwise leave placement to the kernel.
    Auto,
    /// Never set thread affinity.
    None,
}

/// Disjoint CPU sets for the two kinds of threads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuPlan {
    /// Engine loop and kernel pool threads.
    pub compute: Vec<usize>,
    /// The async runtime's workers and blocking threads.
    pub http: Vec<usize>,
}

impl CpuPlan {
    /// Splits `allowed` (the CPUs this process may use) into the last `compute_threads`
    /// CPUs for compute and the rest for HTTP; `None` when that leaves fewer than
    /// `http_threads` for HTTP. Compute takes the high numbers because interrupts and
    /// most housekeeping land on the low ones.
    pub fn split(allowed: &[usize], compute_threads: usize, http_threads: usize) -> Option<Self> {
        if compute_threads == 0
            || http_threads == 0
            || compute_threads.checked_add(http_threads)? > allowed.len()
        {
            return None;
        }
        let (http, compute) = allowed.split_at(allowed.len() - compute_threads);
        Some(CpuPlan {
            compute: compute.to_vec(),
            http: http.to_vec(),
        })
    }
}

/// `0-3,6` style, as the kernel writes CPU lists.
pub fn cpu_list(cpus: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    out.join(",")
}

#[cfg(target_os = "linux")]
mod sys {
    use std::mem::{size_of, zeroed};

    /// The CPUs the calling thread may run on, ascending.
    pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
        // SAFETY: cpu_set_t is plain bits; the kernel fills at most `size_of` bytes of it.
        let mut set: libc::cpu_set_t = unsafe { zeroed() };
        let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let max = 8 * size_of::<libc::cpu_set_t>();
        // SAFETY: CPU_ISSET reads bit `cpu` of the set; every `cpu` is below its size.
        Ok((0..max)
            .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
            .collect())
    }

    /// Restricts the calling thread to `cpus`.
    pub fn pin_current_thread(cpus: &[usize]) -> std::io::Result<()> {
        // SAFETY: as above; callers pass CPUs that `allowed_cpus` listed, all below the
        // set's size.
        let mut set: libc::cpu_set_t = unsafe { zeroed() };
        for &cpu in cpus {
            unsafe { libc::CPU_SET(cpu, &mut set) };
        }
        let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
        Err(std::io::Error::other(
            "thread affinity is only set on Linux",
        ))
    }

    pub fn pin_current_thread(_: &[usize]) -> std::io::Result<()> {
        Err(std::io::Error::other(
            "thread affinity is only set on Linux",
        ))
    }
}

pub use sys::{allowed_cpus, pin_current_thread};

/// Pins the calling thread to `cpus` until dropped, then back to `restore`. The loader
/// holds one while it starts engines, so that their threads inherit the compute cores
/// while the runtime's blocking thread it runs on goes back to the HTTP cores. Placement is
/// a performance choice: if the kernel refuses it (the allowed CPUs changed since they
/// were read), the server logs a warning and runs unpinned rather than not at all.
pub struct PinGuard<'a> {
    restore: &'a [usize],
}

impl<'a> PinGuard<'a> {
    pub fn new(cpus: &[usize], restore: &'a [usize]) -> Self {
        if let Err(e) = pin_current_thread(cpus) {
            tracing::warn!(
                "could not pin the engine threads to CPU {}: {e}; they run unpinned",
                cpu_list(cpus)
            );
        }
        PinGuard { restore }
    }
}

impl Drop for PinGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = pin_current_thread(self.restore) {
            tracing::warn!("moving the loader thread back to the HTTP CPUs: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_gives_compute_the_last_cpus_and_http_the_rest() {
        let plan = CpuPlan::split(&[0, 1], 1, 1).expect("fits");
        assert_eq!((plan.compute, plan.http), (vec![1], vec![0]));
        let plan = CpuPlan::split(&[2, 3, 5, 8, 9], 3, 1).expect("fits");
        assert_eq!((plan.compute, plan.http), (vec![5, 8, 9], vec![2, 3]));
    }

    #[test]
    fn split_declines_when_the_threads_do_not_fit() {
        assert_eq!(CpuPlan::split(&[0, 1], 2, 1), None);
        assert_eq!(CpuPlan::split(&[0], 1, 1), None);
        assert_eq!(CpuPlan::split(&[0, 1, 2], 0, 1), None);
        assert_eq!(CpuPlan::split(&[0, 1, 2], usize::MAX, 1), None);
    }

    #[test]
    fn cpu_lists_read_like_the_kernels() {
        assert_eq!(cpu_list(&[0, 1, 2, 3, 6, 8, 9]), "0-3,6,8-9");
        assert_eq!(cpu_list(&[5]), "5");
        assert_eq!(cpu_list(&[]), "");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn pinning_a_thread_shows_in_its_allowed_cpus() {
        let all = allowed_cpus().expect("sched_getaffinity");
        assert!(!all.is_empty());
        let last = *all.last().unwrap();
        std::thread::spawn(move || {
            let guard = PinGuard::new(&[last], &all);
            assert_eq!(allowed_cpus().unwrap(), vec![last]);
            // A thread started now inherits the pinned set.
            let child = std::thread::spawn(allowed_cpus).join().unwrap().unwrap();
            assert_eq!(child, vec![last]);
            drop(guard);
            assert_eq!(allowed_cpus().unwrap(), all);
        })
        .join()
        .unwrap();
    }
}
