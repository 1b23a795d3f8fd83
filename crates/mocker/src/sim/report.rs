//! What a simulation measured: one record per request and cluster-wide aggregates.

use std::fmt;

use engine::core::FinishReason;
use serde::Serialize;

use super::{SimRequest, Track};

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RequestRecord {
    /// Index in the request list given to the simulator.
    pub req_id: u64,
    pub arrival_s: f64,
    /// The instance the router chose.
    pub instance: usize,
    pub prompt_tokens: u32,
    /// Prompt tokens served from the instance's prefix cache at admission.
    pub cached_prompt_tokens: u32,
    pub output_tokens: u32,
    /// From arrival to the first token; `None` if none came.
    pub ttft_s: Option<f64>,
    /// From arrival to the end.
    pub e2e_s: Option<f64>,
    /// Mean and largest gap between consecutive tokens; `None` with fewer than two tokens.
    pub itl_mean_s: Option<f64>,
    pub itl_max_s: Option<f64>,
    pub finish_reason: Option<FinishReason>,
    /// Why the instance refused the request at admission, if it did.
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct InstanceReport {
    pub requests: u64,
    pub steps: u64,
    /// Virtual seconds spent in steps.
    pub busy_s: f64,
    pub preemptions: u64,
}

/// Distribution of one latency, in seconds; all zero when `count` is 0. Percentiles
/// interpolate linearly between the nearest ranks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl LatencySummary {
    pub fn of(samples: &[f64]) -> Self {
        if samples.is_empty() {
            return LatencySummary::default();
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let pos = q * (s.len() - 1) as f64;
            let lo = pos.floor() as usize;
            let hi = pos.ceil() as usize;
            s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
        };
        LatencySummary {
            count: s.len(),
            mean: s.iter().sum::<f64>() / s.len() as f64,
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: s[s.len() - 1],
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SimReport {
    /// In the order of the request list.
    pub requests: Vec<RequestRecord>,
    pub instances: Vec<InstanceReport>,
    pub ttft: LatencySummary,
    /// Over every gap between consecutive tokens of every request.
    pub itl: LatencySummary,
    pub e2e: LatencySummary,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub output_tokens: u64,
    /// `cached_prompt_tokens / prompt_tokens`.
    pub prefix_hit_rate: f64,
    /// From the first arrival to the last request's end, in virtual seconds.
    pub makespan_s: f64,
    /// Output tokens per virtual second of the makespan.
    pub throughput_tok_s: f64,
    /// Requests the instances refused at admission.
    pub rejected: usize,
}

pub(super) fn build(
    requests: &[SimRequest],
    tracks: &[Track],
    itl: &[f64],
    instances: impl Iterator<Item = InstanceReport>,
) -> SimReport {
    let records: Vec<RequestRecord> = tracks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let gaps = t.output_tokens.saturating_sub(1);
            RequestRecord {
                req_id: i as u64,
                arrival_s: t.arrival_s,
                instance: t.instance.unwrap_or(usize::MAX),
                prompt_tokens: t.prompt_tokens,
                cached_prompt_tokens: t.cached_prompt_tokens,
                output_tokens: t.output_tokens,
                ttft_s: t.first_token_s.map(|f| f - t.arrival_s),
                e2e_s: t.finish_s.map(|f| f - t.arrival_s),
                itl_mean_s: (gaps > 0).then(|| t.itl_sum / gaps as f64),
                itl_max_s: (gaps > 0).then_some(t.itl_max),
                finish_reason: t.finish_reason,
                error: t.error.clone(),
            }
        })
        .collect();
    let ttfts: Vec<f64> = records.iter().filter_map(|r| r.ttft_s).collect();
    let e2es: Vec<f64> = records
        .iter()
        .filter(|r| r.error.is_none())
        .filter_map(|r| r.e2e_s)
        .collect();
    let prompt_tokens: u64 = records.iter().map(|r| r.prompt_tokens as u64).sum();
    let cached: u64 = records.iter().map(|r| r.cached_prompt_tokens as u64).sum();
    let output: u64 = records.iter().map(|r| r.output_tokens as u64).sum();
    let first = requests
        .iter()
        .map(|r| r.arrival_s)
        .fold(f64::INFINITY, f64::min);
    let last = tracks
        .iter()
        .filter_map(|t| t.finish_s)
        .fold(f64::NEG_INFINITY, f64::max);
    let makespan = if last >= first { last - first } else { 0.0 };
    SimReport {
        rejected: records.iter().filter(|r| r.error.is_some()).count(),
        requests: records,
        instances: instances.collect(),
        ttft: LatencySummary::of(&ttfts),
        itl: LatencySummary::of(itl),
        e2e: LatencySummary::of(&e2es),
        prompt_tokens,
        cached_prompt_tokens: cached,
        output_tokens: output,
        prefix_hit_rate: if prompt_tokens > 0 {
            cached as f64 / prompt_tokens as f64
        } else {
            0.0
        },
        makespan_s: makespan,
        throughput_tok_s: if makespan > 0.0 {
            output as f64 / makespan
        } else {
            0.0
        },
    }
}

impl fmt::Display for SimReport {
    /// A few lines for a terminal: latencies in milliseconds.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |s: f64| s * 1e3;
        writeln!(
            f,
            "requests {} (rejected {}) on {} instances, makespan {:.2} s, {:.0} output tok/s",
            self.requests.len(),
            self.rejected,
            self.instances.len(),
            self.makespan_s,
            self.throughput_tok_s
        )?;
        writeln!(
            f,
            "TTFT ms  p50 {:8.1}  p90 {:8.1}  p99 {:8.1}",
            ms(self.ttft.p50),
            ms(self.ttft.p90),
            ms(self.ttft.p99)
        )?;
        writeln!(
            f,
            "ITL  ms  p50 {:8.2}  p99 {:8.2}",
            ms(self.itl.p50),
            ms(self.itl.p99)
        )?;
        let counts: Vec<String> = self
            .instances
            .iter()
            .map(|i| i.requests.to_string())
            .collect();
        write!(
            f,
            "prefix hit rate {:.1}%, requests per instance [{}]",
            100.0 * self.prefix_hit_rate,
            counts.join(" ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate() {
        let s: Vec<f64> = (1..=101).map(f64::from).collect();
        let l = LatencySummary::of(&s);
        assert_eq!((l.p50, l.p90, l.p99, l.max), (51.0, 91.0, 100.0, 101.0));
        assert_eq!(LatencySummary::of(&[]).count, 0);
    }
}
