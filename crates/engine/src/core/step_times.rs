//! A histogram of engine step durations, kept by the engine so that a client measuring
//! inter-token latency can tell the engine's own step time from what the serving path adds.
//! Buckets are log-scale, eight per doubling from 1 µs, so a quantile read from the
//! histogram is within 9% of the true value; two histograms subtract, which gives the steps
//! of a time window.

use std::time::Duration;

use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const PER_DOUBLING: f64 = 8.0;
/// 1 µs to 2^32 µs (about 72 minutes); longer steps land in the last bucket.
const BUCKETS: usize = 32 * PER_DOUBLING as usize;

/// Step durations, counted per bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepTimes {
    /// `counts[i]` steps took at most `upper_us(i)` µs and more than `upper_us(i - 1)`.
    /// Empty until the first step.
    counts: Vec<u64>,
}

impl StepTimes {
    pub fn record(&mut self, d: Duration) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS];
        }
        self.counts[bucket(d.as_secs_f64() * 1e6)] += 1;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Adds another histogram's steps (several instances into one view).
    pub fn merge(&mut self, other: &StepTimes) {
        for (i, &c) in other.counts.iter().enumerate() {
            if c > 0 {
                if self.counts.is_empty() {
                    self.counts = vec![0; BUCKETS];
                }
                self.counts[i] += c;
            }
        }
    }

    /// The steps recorded since `earlier` (a copy taken from the same engine before).
    pub fn since(&self, earlier: &StepTimes) -> StepTimes {
        let mut out = self.clone();
        for (i, &c) in earlier.counts.iter().enumerate() {
            if let Some(n) = out.counts.get_mut(i) {
                *n = n.saturating_sub(c);
            }
        }
        out
    }

    /// The `q`-quantile (0..=1) as the upper edge of its bucket; `None` with no steps.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Duration::from_secs_f64(upper_us(i) * 1e-6));
            }
        }
        None
    }

    /// The non-empty buckets as (upper edge in µs, steps).
    pub fn buckets(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| (upper_us(i), c))
    }
}

fn bucket(us: f64) -> usize {
    if us <= 1.0 {
        return 0;
    }
    ((us.log2() * PER_DOUBLING).ceil() as usize).min(BUCKETS - 1)
}

fn upper_us(i: usize) -> f64 {
    (i as f64 / PER_DOUBLING).exp2()
}

/// Serialized sparsely, as `[[upper_us, steps], ...]` for the non-empty buckets.
impl Serialize for StepTimes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(None)?;
        for (upper, c) in self.buckets() {
            seq.serialize_element(&(upper, c))?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for StepTimes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let pairs = Vec::<(f64, u64)>::deserialize(d)?;
        let mut out = StepTimes::default();
        for (upper, c) in pairs {
            if c > 0 {
                if out.counts.is_empty() {
                    out.counts = vec![0; BUCKETS];
                }
                // Upper edges are exact powers of 2^(1/8): round, not ceil, back to the index.
                let i = if upper <= 1.0 {
                    0
                } else {
                    (upper.log2() * PER_DOUBLING).round() as usize
                };
                out.counts[i.min(BUCKETS - 1)] += c;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(x: f64) -> Duration {
        Duration::from_secs_f64(x * 1e-3)
    }

    #[test]
    fn quantiles_are_within_a_bucket() {
        let mut h = StepTimes::default();
        assert_eq!(h.quantile(0.5), None);
        for i in 1..=100 {
            h.record(ms(i as f64)); // 1..=100 ms
        }
        for (q, want) in [(0.5, 50.0), (0.9, 90.0), (0.99, 99.0), (1.0, 100.0)] {
            let got = h.quantile(q).unwrap().as_secs_f64() * 1e3;
            assert!(got >= want && got <= want * 1.091, "q {q}: {got} ms");
        }
        assert_eq!(h.count(), 100);
    }

    #[test]
    fn windows_merge_and_round_trip() {
        let mut a = StepTimes::default();
        a.record(ms(1.0));
        let before = a.clone();
        a.record(ms(5.0));
        a.record(ms(5.0));
        let window = a.since(&before);
        assert_eq!(window.count(), 2);
        assert!(window.quantile(0.0).unwrap() >= ms(5.0));

        let mut b = StepTimes::default();
        b.record(Duration::from_nanos(10));
        b.record(Duration::from_secs(100_000));
        b.merge(&window);
        assert_eq!(b.count(), 4);
        let json = serde_json::to_string(&b).unwrap();
        let back: StepTimes = serde_json::from_str(&json).unwrap();
        assert_eq!(back, b, "{json}");
        assert_eq!(StepTimes::default().since(&b).count(), 0);
    }
}
