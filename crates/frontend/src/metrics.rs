//! Prometheus metrics for `GET /metrics`: request outcomes and latencies measured by the
//! frontend (what a client sees), plus engine gauges refreshed from `EngineStats` at each
//! scrape. Names follow vLLM's where one exists, under a `switchyard_` prefix.

use std::sync::Arc;
use std::time::Instant;

use engine::core::EngineStats;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric, registered once per frontend.
pub(crate) struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    pub cancelled: IntCounter,
    pub ttft: Histogram,
    pub inter_token: Histogram,
    pub e2e: Histogram,
    pub token_delivery: Histogram,
    pub prompt_tokens: IntCounter,
    pub cached_prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    running: IntGauge,
    waiting: IntGauge,
    kv_usage: Gauge,
    kv_blocks_used: IntGauge,
    kv_blocks_total: IntGauge,
    prefix_queried: IntCounter,
    prefix_hits: IntCounter,
    prefix_hit_rate: Gauge,
    preemptions: IntCounter,
}

const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
const DELIVERY_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 1.0,
];
const E2E_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, m: T) -> T {
    // Names are constants of this file, so a clash is a programming error caught by tests.
    registry
        .register(Box::new(m.clone()))
        .expect("metric names are unique");
    m
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(
        registry,
        IntCounter::new(name, help).expect("valid metric name"),
    )
}

fn int_gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(
        registry,
        IntGauge::new(name, help).expect("valid metric name"),
    )
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Gauge {
    register(registry, Gauge::new(name, help).expect("valid metric name"))
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    register(
        registry,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
            .expect("valid metric name"),
    )
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let requests = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "switchyard_requests_total",
                    "HTTP requests by route and status code.",
                ),
                &["endpoint", "status"],
            )
            .expect("valid metric name"),
        );
        Metrics {
            requests,
            cancelled: counter(
                &r,
                "switchyard_requests_cancelled_total",
                "Generations whose client went away before they finished (their sequences are aborted).",
            ),
            ttft: histogram(
                &r,
                "switchyard_time_to_first_token_seconds",
                "From the request's arrival to its first generated token.",
                TTFT_BUCKETS,
            ),
            inter_token: histogram(
                &r,
                "switchyard_inter_token_latency_seconds",
                "Between consecutive tokens of one sequence, as the frontend receives them.",
                ITL_BUCKETS,
            ),
            e2e: histogram(
                &r,
                "switchyard_e2e_request_latency_seconds",
                "From the request's arrival to its last token (or the client leaving).",
                E2E_BUCKETS,
            ),
            token_delivery: histogram(
                &r,
                "switchyard_token_delivery_seconds",
                "From the engine loop handing a token over to the frontend rendering it for the client: the wait the serving path adds to every token.",
                DELIVERY_BUCKETS,
            ),
            prompt_tokens: counter(&r, "switchyard_prompt_tokens_total", "Prompt tokens admitted."),
            cached_prompt_tokens: counter(
                &r,
                "switchyard_cached_prompt_tokens_total",
                "Prompt tokens served from the prefix cache.",
            ),
            generation_tokens: counter(
                &r,
                "switchyard_generation_tokens_total",
                "Tokens generated.",
            ),
            running: int_gauge(&r, "switchyard_num_requests_running", "Sequences running."),
            waiting: int_gauge(&r, "switchyard_num_requests_waiting", "Sequences waiting."),
            kv_usage: gauge(
                &r,
                "switchyard_kv_cache_usage_ratio",
                "Fraction of KV blocks held by sequences (0 to 1).",
            ),
            kv_blocks_used: int_gauge(&r, "switchyard_kv_blocks_used", "KV blocks held by sequences."),
            kv_blocks_total: int_gauge(&r, "switchyard_kv_blocks_total", "KV blocks in the cache."),
            prefix_queried: counter(
                &r,
                "switchyard_prefix_cache_query_tokens_total",
                "Prompt tokens of admitted sequences looked up in the prefix cache.",
            ),
            prefix_hits: counter(
                &r,
                "switchyard_prefix_cache_hit_tokens_total",
                "Prompt tokens found in the prefix cache.",
            ),
            prefix_hit_rate: gauge(
                &r,
                "switchyard_prefix_cache_hit_rate",
                "Prefix cache hits over queries since start (0 before any query).",
            ),
            preemptions: counter(
                &r,
                "switchyard_preemptions_total",
                "Sequences preempted for lack of KV blocks.",
            ),
            registry: r,
        }
    }

    pub fn count_request(&self, endpoint: &str, status: &str) {
        self.requests.with_label_values(&[endpoint, status]).inc();
    }

    /// Copies engine counters into the registry; the engine keeps totals, so counters are
    /// advanced by the difference.
    pub fn update_engine(&self, s: &EngineStats) {
        self.running.set(s.running as i64);
        self.waiting.set(s.waiting as i64);
        self.kv_usage.set(f64::from(s.kv_usage));
        self.kv_blocks_used.set(s.blocks_used as i64);
        self.kv_blocks_total.set(s.blocks_total as i64);
        advance(&self.prefix_queried, s.prefix_query_tokens);
        advance(&self.prefix_hits, s.prefix_hit_tokens);
        advance(&self.preemptions, s.preemptions);
        let rate = if s.prefix_query_tokens == 0 {
            0.0
        } else {
            s.prefix_hit_tokens as f64 / s.prefix_query_tokens as f64
        };
        self.prefix_hit_rate.set(rate);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which `new` rules out.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!("encoding metrics: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

fn advance(c: &IntCounter, total: u64) {
    let now = c.get();
    if total > now {
        c.inc_by(total - now);
    }
}

/// Latency bookkeeping for one generation request. Dropping it records the end-to-end
/// latency, and counts a cancellation if the request never reached its end (its response
/// future or stream was dropped because the client went away).
pub(crate) struct RequestTimer {
    metrics: Arc<Metrics>,
    start: Instant,
    first_token: bool,
    /// Last token time per choice, for inter-token latency.
    last: Vec<Option<Instant>>,
    complete: bool,
}

impl RequestTimer {
    pub fn new(metrics: Arc<Metrics>, start: Instant, choices: usize) -> Self {
        RequestTimer {
            metrics,
            start,
            first_token: false,
            last: vec![None; choices],
            complete: false,
        }
    }

    /// A token of `choice` arrived.
    pub fn token(&mut self, choice: usize) {
        let now = Instant::now();
        if !self.first_token {
            self.first_token = true;
            self.metrics
                .ttft
                .observe(now.duration_since(self.start).as_secs_f64());
        }
        if let Some(slot) = self.last.get_mut(choice) {
            if let Some(prev) = slot.replace(now) {
                self.metrics
                    .inter_token
                    .observe(now.duration_since(prev).as_secs_f64());
            }
        }
    }

    pub fn complete(&mut self) {
        self.complete = true;
    }
}

impl Drop for RequestTimer {
    fn drop(&mut self) {
        self.metrics.e2e.observe(self.start.elapsed().as_secs_f64());
        if !self.complete {
            self.metrics.cancelled.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_engine_gauges() {
        let m = Metrics::new();
        m.update_engine(&EngineStats {
            running: 2,
            blocks_total: 10,
            blocks_used: 5,
            kv_usage: 0.5,
            prefix_query_tokens: 4,
            prefix_hit_tokens: 1,
            ..EngineStats::default()
        });
        m.count_request("/v1/completions", "200");
        let text = m.render();
        assert!(text.contains("switchyard_num_requests_running 2"), "{text}");
        assert!(
            text.contains("switchyard_kv_cache_usage_ratio 0.5"),
            "{text}"
        );
        assert!(
            text.contains("switchyard_prefix_cache_hit_rate 0.25"),
            "{text}"
        );
        assert!(text
            .contains("switchyard_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 1"));
    }
}
