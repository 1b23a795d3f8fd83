//! Choosing an instance: the routing modes and the KV-aware cost.
//!
//! The KV cost of sending a request to an instance counts, in blocks, the work the
//! instance would have ahead of it:
//!
//! ```text
//! cost = overlap_weight × (prefill tokens queued there + this request's uncached tokens) / block_size
//!      + (blocks held by its active sequences + this request's blocks)
//! ```
//!
//! The first term is prefill left after the cached overlap (what delays the first token);
//! the second is decode load (what slows every step). The smallest cost wins; with a
//! temperature above zero the choice is a softmax over normalised costs instead, which
//! spreads bursts of identical prompts. Ties go to the instance with fewer active
//! sequences, then to a random one.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::InstanceId;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouterMode {
    /// Lowest KV cost (cached overlap against load).
    #[default]
    Kv,
    RoundRobin,
    Random,
    /// Fewest active sequences, then fewest active blocks.
    LeastLoaded,
}

impl RouterMode {
    pub const NAMES: [&'static str; 4] = ["kv", "round-robin", "random", "least-loaded"];

    pub fn name(self) -> &'static str {
        match self {
            RouterMode::Kv => "kv",
            RouterMode::RoundRobin => "round-robin",
            RouterMode::Random => "random",
            RouterMode::LeastLoaded => "least-loaded",
        }
    }
}

impl std::str::FromStr for RouterMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kv" => Ok(RouterMode::Kv),
            "round-robin" => Ok(RouterMode::RoundRobin),
            "random" => Ok(RouterMode::Random),
            "least-loaded" => Ok(RouterMode::LeastLoaded),
            _ => Err(format!(
                "unknown router mode {s:?}; expected one of {}",
                RouterMode::NAMES.join(", ")
            )),
        }
    }
}

/// Tuning of the KV cost.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvWeights {
    /// How much a block of prefill counts against a block of decode load.
    pub overlap_weight: f64,
    /// 0 picks the minimum cost; above 0, a softmax over costs normalised to [0, 1].
    pub temperature: f64,
}

impl Default for KvWeights {
    /// `overlap_weight` 8: on the reference cost model (an 8B model on an H100) prefilling a
    /// block costs about 0.8 ms of compute, while a block held by a decoding sequence adds
    /// about 0.8 µs to each of its remaining ~100-300 steps, so a prefill block is worth
    /// roughly 3-8 decode blocks. The cluster simulator (`bench sim`, docs/benchmarks.md)
    /// agrees: 8 beat 1, 2 and 4 on TTFT and hit rate in every scenario tried, with no
    /// loss of throughput.
    fn default() -> Self {
        KvWeights {
            overlap_weight: 8.0,
            temperature: 0.0,
        }
    }
}

/// An instance's load as the router tracks it (see [`crate::active`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    pub active_seqs: usize,
    /// KV blocks of the prompts of its active sequences.
    pub active_blocks: usize,
    /// Uncached prompt tokens of sequences routed there that have no first token yet.
    pub prefill_tokens: usize,
}

/// One instance as the policy sees it for one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    pub instance: InstanceId,
    /// Leading blocks of the prompt the instance holds in its prefix cache.
    pub overlap_blocks: u32,
    pub load: Load,
}

/// The request being routed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteRequest {
    pub prompt_tokens: usize,
    pub block_size: usize,
}

impl RouteRequest {
    pub fn blocks(&self) -> usize {
        self.prompt_tokens.div_ceil(self.block_size.max(1))
    }

    /// Prompt tokens an instance holding `overlap_blocks` would still compute. The last
    /// token is always computed (its logits are needed), as the engine does.
    pub fn new_tokens(&self, overlap_blocks: u32) -> usize {
        let cached =
            (overlap_blocks as usize * self.block_size).min(self.prompt_tokens.saturating_sub(1));
        self.prompt_tokens - cached
    }
}

/// The KV cost of `c` for `req` (lower is better).
pub fn kv_cost(c: &Candidate, req: &RouteRequest, w: &KvWeights) -> f64 {
    let bs = req.block_size.max(1) as f64;
    let prefill = (c.load.prefill_tokens + req.new_tokens(c.overlap_blocks)) as f64 / bs;
    let decode = (c.load.active_blocks + req.blocks()) as f64;
    w.overlap_weight * prefill + decode
}

/// Picks among candidates; holds the round-robin position and the random generator.
pub struct Selector {
    mode: RouterMode,
    weights: KvWeights,
    next: usize,
    rng: ChaCha8Rng,
    scratch: Vec<f64>,
}

impl Selector {
    pub fn new(mode: RouterMode, weights: KvWeights, seed: u64) -> Self {
        Selector {
            mode,
            weights,
            next: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
            scratch: Vec::new(),
        }
    }

    pub fn mode(&self) -> RouterMode {
        self.mode
    }

    /// The index in `cands` of the chosen instance; `None` when there is none.
    /// Round-robin relies on `cands` coming in a stable order (e.g. by instance id).
    pub fn select(&mut self, cands: &[Candidate], req: &RouteRequest) -> Option<usize> {
        if cands.is_empty() {
            return None;
        }
        let i = match self.mode {
            RouterMode::RoundRobin => {
                let i = self.next % cands.len();
                self.next = self.next.wrapping_add(1);
                i
            }
            RouterMode::Random => self.rng.random_range(0..cands.len()),
            RouterMode::LeastLoaded => {
                let key = |c: &Candidate| (c.load.active_seqs, c.load.active_blocks);
                let best = cands.iter().map(key).min().expect("non-empty");
                self.pick_tied(cands, |c| key(c) == best)
            }
            RouterMode::Kv => self.select_kv(cands, req),
        };
        Some(i)
    }

    fn select_kv(&mut self, cands: &[Candidate], req: &RouteRequest) -> usize {
        let mut costs = std::mem::take(&mut self.scratch);
        costs.clear();
        costs.extend(cands.iter().map(|c| kv_cost(c, req, &self.weights)));
        let (lo, hi) = costs
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &c| {
                (lo.min(c), hi.max(c))
            });
        let i = if self.weights.temperature > 0.0 && hi > lo {
            // Softmax over -normalised cost: the cheapest has weight 1, the dearest e^(-1/T).
            let t = self.weights.temperature;
            let total: f64 = costs
                .iter()
                .map(|&c| (-(c - lo) / (hi - lo) / t).exp())
                .sum();
            let mut u = self.rng.random::<f64>() * total;
            let mut pick = costs.len() - 1;
            for (i, &c) in costs.iter().enumerate() {
                u -= (-(c - lo) / (hi - lo) / t).exp();
                if u <= 0.0 {
                    pick = i;
                    break;
                }
            }
            pick
        } else {
            // Among the cheapest, the fewest active sequences, then random.
            let min_seqs = cands
                .iter()
                .zip(&costs)
                .filter(|(_, &c)| c == lo)
                .map(|(c, _)| c.load.active_seqs)
                .min()
                .expect("at least one candidate has the minimum cost");
            let tied: Vec<bool> = cands
                .iter()
                .zip(&costs)
                .map(|(c, &cost)| cost == lo && c.load.active_seqs == min_seqs)
                .collect();
            let mut k = 0;
            self.pick_tied(cands, |_| {
                k += 1;
                tied[k - 1]
            })
        };
        self.scratch = costs;
        i
    }

    /// A uniformly random index among those `is_tied` accepts (called once per candidate,
    /// in order).
    fn pick_tied(
        &mut self,
        cands: &[Candidate],
        mut is_tied: impl FnMut(&Candidate) -> bool,
    ) -> usize {
        let mut chosen = 0;
        let mut seen = 0u32;
        for (i, c) in cands.iter().enumerate() {
            if is_tied(c) {
                seen += 1;
                // Reservoir sampling of one: the k-th tie replaces the choice with p = 1/k.
                if seen == 1 || self.rng.random_range(0..seen) == 0 {
                    chosen = i;
                }
            }
        }
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(id: u64, overlap: u32, seqs: usize, blocks: usize, prefill: usize) -> Candidate {
        Candidate {
            instance: id,
            overlap_blocks: overlap,
            load: Load {
                active_seqs: seqs,
                active_blocks: blocks,
                prefill_tokens: prefill,
            },
        }
    }

    const REQ: RouteRequest = RouteRequest {
        prompt_tokens: 64,
        block_size: 16,
    };

    #[test]
    fn kv_prefers_the_overlap_when_load_is_equal() {
        let mut s = Selector::new(RouterMode::Kv, KvWeights::default(), 1);
        let c = [
            cand(1, 0, 0, 0, 0),
            cand(2, 3, 0, 0, 0),
            cand(3, 1, 0, 0, 0),
        ];
        for _ in 0..20 {
            assert_eq!(s.select(&c, &REQ), Some(1));
        }
    }

    #[test]
    fn kv_leaves_a_cached_instance_that_is_overloaded() {
        let mut s = Selector::new(RouterMode::Kv, KvWeights::default(), 1);
        // Instance 2 holds 3 of 4 blocks but has 40 blocks of decode and a queued prefill.
        let c = [cand(1, 0, 1, 4, 0), cand(2, 3, 10, 40, 256)];
        assert_eq!(s.select(&c, &REQ), Some(0));
        // Without the load it wins.
        let c = [cand(1, 0, 1, 4, 0), cand(2, 3, 1, 4, 0)];
        assert_eq!(s.select(&c, &REQ), Some(1));
    }

    #[test]
    fn cost_counts_the_last_token_even_when_fully_cached() {
        assert_eq!(REQ.new_tokens(4), 1);
        assert_eq!(REQ.new_tokens(9), 1);
        assert_eq!(REQ.new_tokens(0), 64);
        let w = KvWeights {
            overlap_weight: 1.0,
            temperature: 0.0,
        };
        // 1 token of prefill is 1/16 block, plus 4 blocks of its own.
        assert!((kv_cost(&cand(1, 4, 0, 0, 0), &REQ, &w) - (1.0 / 16.0 + 4.0)).abs() < 1e-12);
    }

    #[test]
    fn ties_break_by_active_sequences_then_spread() {
        let mut s = Selector::new(RouterMode::Kv, KvWeights::default(), 7);
        // Same cost; instance 1 runs fewer sequences.
        let c = [cand(0, 0, 3, 0, 0), cand(1, 0, 1, 0, 0)];
        assert_eq!(s.select(&c, &REQ), Some(1));
        // A full tie spreads over all of them.
        let c = [
            cand(0, 0, 0, 0, 0),
            cand(1, 0, 0, 0, 0),
            cand(2, 0, 0, 0, 0),
        ];
        let mut hits = [0; 3];
        for _ in 0..300 {
            hits[s.select(&c, &REQ).unwrap()] += 1;
        }
        assert!(hits.iter().all(|&h| h > 50), "{hits:?}");
    }

    #[test]
    fn temperature_spreads_but_favours_the_cheapest() {
        let w = KvWeights {
            overlap_weight: 1.0,
            temperature: 0.5,
        };
        let mut s = Selector::new(RouterMode::Kv, w, 3);
        let c = [cand(0, 4, 0, 0, 0), cand(1, 0, 0, 0, 0)];
        let mut hits = [0; 2];
        for _ in 0..1000 {
            hits[s.select(&c, &REQ).unwrap()] += 1;
        }
        // Weights 1 and e^-2: about 88% / 12%.
        assert!(hits[0] > 800 && hits[1] > 60, "{hits:?}");
    }

    #[test]
    fn round_robin_random_and_least_loaded() {
        let c = [
            cand(0, 9, 5, 0, 0),
            cand(1, 0, 2, 9, 0),
            cand(2, 0, 2, 3, 0),
        ];
        let mut rr = Selector::new(RouterMode::RoundRobin, KvWeights::default(), 0);
        let picks: Vec<_> = (0..6).map(|_| rr.select(&c, &REQ).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        let mut ll = Selector::new(RouterMode::LeastLoaded, KvWeights::default(), 0);
        assert_eq!(ll.select(&c, &REQ), Some(2));
        let mut rnd = Selector::new(RouterMode::Random, KvWeights::default(), 0);
        let mut hits = [0; 3];
        for _ in 0..300 {
            hits[rnd.select(&c, &REQ).unwrap()] += 1;
        }
        assert!(hits.iter().all(|&h| h > 60), "{hits:?}");
        assert_eq!(rnd.select(&[], &REQ), None);
    }

    #[test]
    fn modes_parse_by_name() {
        for name in RouterMode::NAMES {
            assert_eq!(name.parse::<RouterMode>().unwrap().name(), name);
        }
        assert!("fastest"
            .parse::<RouterMode>()
            .unwrap_err()
            .contains("round-robin"));
    }
}
