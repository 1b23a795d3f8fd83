//! Hot CPU kernels for the decoder: weight-streaming matmuls over f32/bf16/f16 weights, a
//! low-latency thread pool, and the small f32 vector helpers the model calls per token.
//!
//! The fast path is AVX2 + FMA + F16C, detected at run time (the binary stays portable and
//! nothing needs `-C target-cpu`); every kernel has a portable scalar twin that runs
//! elsewhere and that the tests hold the fast path to.
//!
//! Everything here may be called from any thread. `parallel_for` (and so `matmul`) runs one
//! job at a time on the shared pool: concurrent callers queue, and calls made from inside a
//! job run inline on the calling thread. `examples/kernels_bench.rs` measures it all on the
//! target model's shapes.

#[cfg(target_arch = "x86_64")]
mod avx2;
mod bandwidth;
mod matmul;
mod matrix;
mod pool;
mod vector;

pub use bandwidth::measure_read_bandwidth_gbs;
pub use matmul::matmul;
pub use matrix::{Matrix, WeightData};
pub use pool::{num_threads, parallel_for, set_num_threads};
pub use vector::{axpy, dot, scale};

/// Deterministic values in [-1, 1) for the CPU kernels' tests, without an RNG crate.
#[cfg(test)]
pub(crate) fn test_fill(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Which implementation the kernels use on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Isa {
    /// The best implementation this CPU supports (std caches the CPUID probe).
    pub(crate) fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Isa::Avx2;
        }
        Isa::Scalar
    }
}

/// Whether the AVX2 + FMA paths run on this CPU (for kernels outside this module that
/// compile a `#[target_feature]` twin of their loops).
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        Isa::detect() == Isa::Avx2
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
