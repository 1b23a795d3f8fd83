//! Deterministic randomness for weights and the tokenizer corpus. Every stream is keyed by
//! (seed, name, chunk index) through a stable hash, so the bytes written never depend on
//! thread count, scheduling or the standard library's hasher. The generator is xoshiro256++
//! seeded through splitmix64, written here because it is tiny and its output is pinned.

/// One step of splitmix64: a good 64-bit mixer and the recommended xoshiro seeder.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a over bytes: stable across Rust releases, unlike `DefaultHasher`.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// xoshiro256++.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn from_seed(seed: u64) -> Self {
        let mut sm = seed;
        Rng {
            s: [
                splitmix64(&mut sm),
                splitmix64(&mut sm),
                splitmix64(&mut sm),
                splitmix64(&mut sm),
            ],
        }
    }

    /// The stream for chunk `chunk` of the thing called `name` under `seed`.
    pub fn for_stream(seed: u64, name: &str, chunk: u64) -> Self {
        let mut k = seed ^ stable_hash(name.as_bytes());
        let a = splitmix64(&mut k);
        let mut k2 = a ^ chunk.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        Self::from_seed(splitmix64(&mut k2))
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `0..n` (n > 0); the slight modulo bias is irrelevant for corpus text.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() >> 11) % n as u64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Approximately standard normal: the Irwin-Hall sum of four 16-bit uniforms from one
    /// draw, rescaled to unit variance. Bounded at about ±3.5σ, which suits weights, and an
    /// order of magnitude cheaper than Box-Muller, which matters for 8B parameters.
    #[inline]
    pub fn normalish(&mut self) -> f32 {
        const SCALE: f32 = 1.732_050_8 / 65_536.0; // sqrt(3) / 2^16
        let x = self.next_u64();
        let sum = (x & 0xFFFF) + ((x >> 16) & 0xFFFF) + ((x >> 32) & 0xFFFF) + (x >> 48);
        // Mean of the sum is 2 * 65535 ~= 131_070; subtracting 2^17 - 2 centres it exactly.
        (sum as f32 - 131_070.0) * SCALE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_depend_on_seed_name_and_chunk() {
        let mut r = Rng::for_stream(7, "model.norm.weight", 0);
        let v: Vec<u64> = (0..2).map(|_| r.next_u64()).collect();
        let mut again = Rng::for_stream(7, "model.norm.weight", 0);
        assert_eq!(v, [again.next_u64(), again.next_u64()]);
        assert_ne!(
            Rng::for_stream(7, "model.norm.weight", 1).next_u64(),
            v[0],
            "chunks must differ"
        );
        assert_ne!(Rng::for_stream(8, "model.norm.weight", 0).next_u64(), v[0]);
    }

    #[test]
    fn normalish_has_unit_variance() {
        let mut r = Rng::from_seed(1);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| f64::from(r.normalish())).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
    }
}
