//! [`MockExecutor`]: the engine's [`Executor`] with no model behind it. Tokens come from a
//! hash of (last token, position), so a prompt always continues the same way; the time a
//! step would take comes from a [`StepCost`] and is either slept (wall-clock serving) or
//! only recorded (virtual-time simulation).

use std::time::{Duration, Instant};

use engine::backend::{ForwardBatch, RowSampling};
use engine::core::Executor;
use serde::{Deserialize, Serialize};

use crate::cost::StepCost;

/// How the modelled step time is spent.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Timing {
    /// Each step sleeps its modelled time divided by `speedup`.
    WallClock { speedup: f64 },
    /// No sleeping: the step's time is only recorded, for a caller that keeps its own clock.
    Virtual,
}

/// The logit of the chosen token in [`Executor::execute`] rows; every other token gets 0,
/// so even temperature sampling picks the chosen one all but surely.
const CHOSEN_LOGIT: f32 = 30.0;

/// Below this a wall-clock step does not sleep at all.
const MIN_SLEEP: Duration = Duration::from_micros(5);
/// The tail of a sleep that is spun rather than left to the OS timer.
const SPIN_TAIL: Duration = Duration::from_micros(100);

pub struct MockExecutor {
    vocab_size: usize,
    /// Tokens are chosen from `0..output_vocab`.
    output_vocab: u32,
    eos_token_ids: Vec<u32>,
    eos_probability: f64,
    cost: StepCost,
    timing: Timing,
    last_step_s: f64,
    total_s: f64,
    steps: u64,
}

impl MockExecutor {
    /// Parts are checked by [`crate::MockOptions::validate`]; `output_vocab` must hold at
    /// least one token that is not an EOS id.
    pub fn new(
        vocab_size: usize,
        output_vocab: usize,
        eos_token_ids: Vec<u32>,
        eos_probability: f64,
        cost: StepCost,
        timing: Timing,
    ) -> Self {
        MockExecutor {
            vocab_size,
            output_vocab: output_vocab.clamp(1, vocab_size.max(1)) as u32,
            eos_token_ids,
            eos_probability,
            cost,
            timing,
            last_step_s: 0.0,
            total_s: 0.0,
            steps: 0,
        }
    }

    /// Modelled time of the last step, in seconds (before any speedup).
    pub fn last_step_seconds(&self) -> f64 {
        self.last_step_s
    }

    /// Modelled time of every step so far, in seconds.
    pub fn total_seconds(&self) -> f64 {
        self.total_s
    }

    /// Forward steps run so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    pub fn cost(&self) -> &StepCost {
        &self.cost
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// The token that follows `last` at position `pos`.
    pub fn next_token(&self, last: u32, pos: u32) -> u32 {
        let h = mix64(((last as u64) << 32 | pos as u64) ^ 0x6d6f_636b_6572_5f31);
        if self.eos_probability > 0.0 && !self.eos_token_ids.is_empty() {
            let u = (mix64(h) >> 11) as f64 / (1u64 << 53) as f64;
            if u < self.eos_probability {
                return self.eos_token_ids[0];
            }
        }
        let n = self.output_vocab;
        let mut t = (h % n as u64) as u32;
        // Walk past EOS ids; bounded in case the options let every id be one.
        for _ in 0..n {
            if !self.eos_token_ids.contains(&t) {
                break;
            }
            t = (t + 1) % n;
        }
        t
    }

    /// Charges the step's modelled time and, on the wall clock, waits it out.
    fn run_step(&mut self, batch: &ForwardBatch) {
        let start = Instant::now();
        let secs = self.cost.step_seconds(batch);
        self.last_step_s = secs;
        self.total_s += secs;
        self.steps += 1;
        if let Timing::WallClock { speedup } = self.timing {
            let wait = secs / speedup;
            if wait.is_finite() && wait > 0.0 {
                sleep_until(start, Duration::from_secs_f64(wait));
            }
        }
    }

    fn sampled_tokens(&self, batch: &ForwardBatch) -> Vec<u32> {
        batch
            .logit_rows
            .iter()
            .map(|&r| {
                let r = r as usize;
                self.next_token(batch.token_ids[r], batch.positions[r])
            })
            .collect()
    }
}

impl Executor for MockExecutor {
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn execute(&mut self, batch: &ForwardBatch) -> Vec<f32> {
        self.run_step(batch);
        let tokens = self.sampled_tokens(batch);
        let mut logits = vec![0.0f32; tokens.len() * self.vocab_size];
        for (row, &t) in tokens.iter().enumerate() {
            logits[row * self.vocab_size + t as usize] = CHOSEN_LOGIT;
        }
        logits
    }

    fn execute_greedy(&mut self, batch: &ForwardBatch) -> Option<Vec<u32>> {
        self.run_step(batch);
        Some(self.sampled_tokens(batch))
    }

    fn has_device_sampling(&self) -> bool {
        true
    }

    /// The chosen token dominates its row so completely that any filter or uniform keeps
    /// it; returning it directly skips building the rows.
    fn execute_sample(&mut self, batch: &ForwardBatch, _rows: &[RowSampling]) -> Option<Vec<u32>> {
        self.run_step(batch);
        Some(self.sampled_tokens(batch))
    }
}

/// Sleeps until `start + d`: the OS timer for the bulk, a spin for the last stretch, whose
/// wake-up jitter would otherwise add tens of microseconds to every step.
fn sleep_until(start: Instant, d: Duration) {
    if d < MIN_SLEEP {
        return;
    }
    let deadline = start + d;
    let now = Instant::now();
    if deadline <= now {
        return;
    }
    let left = deadline - now;
    if left > SPIN_TAIL {
        std::thread::sleep(left - SPIN_TAIL);
    }
    while Instant::now() < deadline {
        std::hint::spin_loop();
    }
}

/// SplitMix64's finaliser: a cheap, well-mixed 64-bit hash.
fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::CostModel;
    use engine::backend::SeqSlice;

    fn exec(timing: Timing) -> MockExecutor {
        MockExecutor::new(
            64,
            64,
            vec![0, 1, 2],
            0.0,
            StepCost::Model(CostModel::default()),
            timing,
        )
    }

    fn decode_batch(rows: usize) -> ForwardBatch {
        ForwardBatch {
            token_ids: (0..rows as u32).collect(),
            positions: vec![10; rows],
            slots: vec![0; rows],
            seqs: (0..rows)
                .map(|i| SeqSlice {
                    q_start: i,
                    q_len: 1,
                    ctx_len: 11,
                    block_table: vec![0],
                })
                .collect(),
            logit_rows: (0..rows as u32).collect(),
            block_size: 16,
        }
    }

    #[test]
    fn tokens_are_deterministic_and_never_eos() {
        let e = exec(Timing::Virtual);
        for last in 0..64 {
            for pos in 0..64 {
                let t = e.next_token(last, pos);
                assert!((3..64).contains(&t));
                assert_eq!(t, e.next_token(last, pos));
            }
        }
    }

    #[test]
    fn eos_probability_one_always_stops() {
        let e = MockExecutor::new(64, 64, vec![7], 1.0, StepCost::default(), Timing::Virtual);
        assert_eq!(e.next_token(5, 5), 7);
    }

    #[test]
    fn logits_put_the_greedy_token_on_top() {
        let mut e = exec(Timing::Virtual);
        let batch = decode_batch(3);
        let greedy = e.execute_greedy(&batch).unwrap();
        let logits = e.execute(&batch);
        for (row, &t) in greedy.iter().enumerate() {
            let r = &logits[row * 64..(row + 1) * 64];
            let best = (0..64).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap();
            assert_eq!(best as u32, t);
        }
        assert_eq!(e.steps(), 2);
        let one = CostModel::default().step_seconds(&batch);
        assert!((e.last_step_seconds() - one).abs() < 1e-15);
        assert!((e.total_seconds() - 2.0 * one).abs() < 1e-15);
    }

    #[test]
    fn wall_clock_sleeps_the_modelled_time() {
        let mut e = exec(Timing::WallClock { speedup: 2.0 });
        let batch = decode_batch(1);
        let t = Instant::now();
        e.execute_greedy(&batch);
        let slept = t.elapsed().as_secs_f64();
        let want = e.last_step_seconds() / 2.0;
        assert!(slept >= want, "{slept} < {want}");
        assert!(slept < want + 0.05, "{slept} ≫ {want}");
    }
}
