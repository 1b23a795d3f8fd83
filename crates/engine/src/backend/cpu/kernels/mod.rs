//! Hot CPU kernels for the decoder: weight-streaming matmuls over f32/bf16/f16 weights, a
//! low-latency thread pool, and the small f32 vector helpers the model calls per token.
//!
//! The fast path is AVX2 + FMA + F16C, and for matmuls over bf16 weights AVX-512 BF16 where
//! the CPU has it (Zen 4, Sapphire Rapids and later; see `avx512.rs`), detected at run time
//! (the binary stays portable and nothing needs `-C target-cpu`; `SWITCHYARD_CPU_ISA` caps
//! the choice). Every kernel has a portable scalar twin that runs elsewhere and that the
//! tests hold the fast paths to.
//!
//! Everything here may be called from any thread. `parallel_for` (and so `matmul`) runs one
//! job at a time on the shared pool: concurrent callers queue, and calls made from inside a
//! job run inline on the calling thread. `examples/kernels_bench.rs` measures it all on the
//! target model's shapes.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
mod bandwidth;
mod matmul;
mod matrix;
mod pool;
#[cfg(target_arch = "x86_64")]
mod tiles;
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
    /// AVX2 + FMA + F16C.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// All of `Avx2`, plus AVX-512 F/BW/BF16 for matmuls over bf16 weights (which then
    /// round their activations to bf16; see `avx512.rs`). Everything else runs as `Avx2`.
    #[cfg(target_arch = "x86_64")]
    Avx512Bf16,
}

/// Caps the detected ISA, for comparing paths with one binary: `scalar`, `avx2` or
/// `avx512bf16` (the default: the best the CPU has).
pub const ISA_ENV: &str = "SWITCHYARD_CPU_ISA";

impl Isa {
    /// The best implementation this CPU supports, capped by `SWITCHYARD_CPU_ISA`; probed
    /// once per process.
    pub(crate) fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Isa::supported();
            match std::env::var(ISA_ENV).as_deref() {
                Ok("scalar") => Isa::Scalar,
                #[cfg(target_arch = "x86_64")]
                Ok("avx2") if best != Isa::Scalar => Isa::Avx2,
                _ => best,
            }
        })
    }

    fn supported() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512bf16")
            {
                return Isa::Avx512Bf16;
            }
            return Isa::Avx2;
        }
        Isa::Scalar
    }

    /// The name `SWITCHYARD_CPU_ISA` takes, for logs and benchmark tables.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => "avx512bf16",
        }
    }
}

/// The kernels' ISA on this CPU, by the name `SWITCHYARD_CPU_ISA` takes.
pub fn isa_name() -> &'static str {
    Isa::detect().name()
}

/// Whether the AVX-512 BF16 paths run on this CPU (and `SWITCHYARD_CPU_ISA` allows them).
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        Isa::detect() == Isa::Avx512Bf16
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AVX2 + FMA paths run on this CPU (for kernels outside this module that
/// compile a `#[target_feature]` twin of their loops).
pub fn has_avx2_fma() -> bool {
    Isa::detect() != Isa::Scalar
}
