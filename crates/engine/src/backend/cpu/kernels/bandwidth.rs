//! Main-memory read bandwidth, measured the way the decode kernels read weights: every
//! kernel thread streams its own contiguous part of a buffer far larger than the L3.
//! The number is the roofline for batch-1 decode (bytes of weights per token / bandwidth).

use std::time::Instant;

use super::pool::{num_threads, parallel_for};
use super::Isa;

/// 512 MiB: 16× the 32 MB L3 of the target machine, so no pass is served from cache.
const BUFFER_BYTES: usize = 512 << 20;
const PASSES: usize = 5;

/// Best-of-five read bandwidth in GB/s (10⁹ bytes per second) using all kernel threads.
/// Takes about half a second, most of it first-touching the buffer.
pub fn measure_read_bandwidth_gbs() -> f64 {
    let len = BUFFER_BYTES / 4;
    let threads = num_threads().max(1);
    let chunk = len.div_ceil(threads);
    let mut buf: Vec<f32> = Vec::with_capacity(len);
    // First touch from the threads that will read each part, so pages land near them.
    let ptr = SendPtr(buf.spare_capacity_mut().as_mut_ptr().cast::<f32>());
    parallel_for(threads, |t| {
        let (a, b) = (t * chunk, ((t + 1) * chunk).min(len));
        for i in a..b {
            // SAFETY: `i < len` = capacity, and the threads' ranges are disjoint.
            unsafe { ptr.get().add(i).write(i as f32) };
        }
    });
    // SAFETY: every element in 0..len was initialised above.
    unsafe { buf.set_len(len) };

    let mut best = f64::INFINITY;
    let mut sink = 0.0f32;
    for _ in 0..PASSES {
        let sums: Vec<std::sync::Mutex<f32>> =
            (0..threads).map(|_| std::sync::Mutex::new(0.0)).collect();
        let start = Instant::now();
        parallel_for(threads, |t| {
            let part = &buf[t * chunk..((t + 1) * chunk).min(len)];
            *sums[t].lock().unwrap() = read_sum(part);
        });
        best = best.min(start.elapsed().as_secs_f64());
        sink += sums.iter().map(|s| *s.lock().unwrap()).sum::<f32>();
    }
    std::hint::black_box(sink);
    BUFFER_BYTES as f64 / best / 1e9
}

fn read_sum(a: &[f32]) -> f32 {
    match Isa::detect() {
        // SAFETY: both ISAs `detect` returned here include AVX2, FMA and F16C.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Bf16 => unsafe { super::avx2::read_sum(a) },
        Isa::Scalar => a.iter().sum(),
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used for the disjoint first-touch writes above.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}
