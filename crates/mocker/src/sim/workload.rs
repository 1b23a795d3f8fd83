//! Deterministic synthetic workloads for the simulator.

use super::SimRequest;

/// Requests in groups that share a prompt prefix (a system prompt, a document, a chat
/// history), each with its own suffix, arriving as a Poisson process. The same seed gives
/// the same requests.
#[derive(Clone, Debug, PartialEq)]
pub struct SharedPrefixWorkload {
    pub num_requests: usize,
    pub num_groups: usize,
    pub prefix_tokens: usize,
    pub suffix_tokens: usize,
    pub max_tokens: u32,
    /// Mean arrivals per second of virtual time.
    pub rate_per_s: f64,
    /// Prompt tokens are drawn from `0..vocab_size`.
    pub vocab_size: u32,
    pub seed: u64,
}

impl SharedPrefixWorkload {
    /// The requests, by arrival, and the group of each.
    pub fn generate(&self) -> (Vec<SimRequest>, Vec<usize>) {
        let mut rng = SplitMix(self.seed);
        let vocab = self.vocab_size.max(1) as u64;
        let groups = self.num_groups.max(1);
        let prefixes: Vec<Vec<u32>> = (0..groups)
            .map(|_| {
                (0..self.prefix_tokens)
                    .map(|_| (rng.next() % vocab) as u32)
                    .collect()
            })
            .collect();
        let mut t = 0.0;
        let mut reqs = Vec::with_capacity(self.num_requests);
        let mut group_of = Vec::with_capacity(self.num_requests);
        for _ in 0..self.num_requests {
            // Exponential gaps; 1 − u keeps the logarithm finite.
            if self.rate_per_s > 0.0 {
                t += -(1.0 - rng.uniform()).ln() / self.rate_per_s;
            }
            let g = (rng.next() % groups as u64) as usize;
            let mut prompt = prefixes[g].clone();
            prompt.extend((0..self.suffix_tokens).map(|_| (rng.next() % vocab) as u32));
            reqs.push(SimRequest {
                arrival_s: t,
                prompt,
                max_tokens: self.max_tokens,
            });
            group_of.push(g);
        }
        (reqs, group_of)
    }
}

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}
