//! `switchyard bench sim`: routing experiments on a simulated cluster, in virtual time.
//!
//! N mock instances (the real scheduler and block pool, step times from a cost model or a
//! measured profile) run in one thread under `mocker::sim`; the router under test is the
//! real one (`router::index::KvIndex`, `router::policy::Selector`,
//! `router::active::ActiveSequences`), fed the instances' KV events as each step ends.
//! Every routing mode sees the same requests. No HTTP, no threads: a 16-instance, thousands
//! of requests experiment takes seconds on two cores.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use mocker::sim::workload::SharedPrefixWorkload;
use mocker::sim::{SimReport, SimRequest, SimRouter, Simulator};
use mocker::{MockOptions, Profile, StepCost};
use protocol::KvEvent;
use router::active::ActiveSequences;
use router::index::KvIndex;
use router::policy::{Candidate, KvWeights, RouteRequest, RouterMode, Selector};
use serde::Serialize;

use crate::workload::{load_mooncake, MooncakeOptions};

/// Where the requests come from.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SimWorkload {
    /// Groups sharing a long prefix, each request with its own suffix, Poisson arrivals.
    SharedPrefix {
        requests: usize,
        groups: usize,
        prefix_tokens: usize,
        suffix_tokens: usize,
        max_tokens: u32,
    },
    /// A Mooncake trace at its own arrival times (scaled by `speedup`).
    Mooncake {
        trace: PathBuf,
        options: MooncakeOptions,
    },
}

/// How fast requests arrive (shared-prefix workload only; a trace brings its own times).
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SimLoad {
    /// Requests per second of virtual time.
    Rate(f64),
    /// A fraction of the cluster's capacity, measured first: the request rate the
    /// instances complete under round-robin with every request queued at time 0.
    CapacityFraction(f64),
}

#[derive(Clone, Debug)]
pub struct SimBenchOptions {
    pub workload: SimWorkload,
    pub load: SimLoad,
    pub instances: usize,
    pub modes: Vec<RouterMode>,
    pub weights: KvWeights,
    /// Per instance: KV blocks, block size, batch limits, cost.
    pub instance: MockOptions,
    pub slo_ttft_s: f64,
    pub slo_itl_s: f64,
    pub seed: u64,
}

/// One routing mode's results.
#[derive(Clone, Debug, Serialize)]
pub struct ModeResult {
    pub mode: &'static str,
    pub ttft_p50_s: f64,
    pub ttft_p90_s: f64,
    pub ttft_p99_s: f64,
    pub itl_p50_s: f64,
    pub itl_p99_s: f64,
    pub e2e_p50_s: f64,
    pub throughput_tok_s: f64,
    pub requests_per_s: f64,
    pub prefix_hit_rate: f64,
    pub goodput_fraction: f64,
    pub goodput_requests_per_s: f64,
    pub makespan_s: f64,
    pub preemptions: u64,
    pub rejected: usize,
    /// Requests each instance received.
    pub per_instance: Vec<u64>,
    /// Wall time of one routing decision (hashing, index lookup, cost), mean over the run.
    pub route_us_mean: f64,
    /// Wall time of the whole simulation.
    pub wall_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SimBenchReport {
    pub workload: SimWorkload,
    pub instances: usize,
    pub kv_blocks_per_instance: usize,
    pub block_size: usize,
    pub requests: usize,
    pub mean_prompt_tokens: f64,
    /// The arrival rate used, requests per second of virtual time (`None`: trace times).
    pub rate_per_s: Option<f64>,
    /// The measured capacity, when the load was given as a fraction of it.
    pub capacity_per_s: Option<f64>,
    pub slo_ttft_s: f64,
    pub slo_itl_s: f64,
    pub results: Vec<ModeResult>,
}

/// The real router's parts, driven by the simulator.
pub struct RouterSim {
    index: KvIndex,
    active: ActiveSequences,
    selector: Selector,
    mode: RouterMode,
    block_size: usize,
    instances: usize,
    overlaps: Vec<(u64, u32)>,
    cands: Vec<Candidate>,
    route_ns: u128,
    routes: u64,
}

impl RouterSim {
    pub fn new(
        mode: RouterMode,
        weights: KvWeights,
        instances: usize,
        block_size: usize,
        seed: u64,
    ) -> Self {
        let mut index = KvIndex::new();
        for i in 0..instances {
            index.add_instance(i as u64);
        }
        RouterSim {
            index,
            active: ActiveSequences::new(),
            selector: Selector::new(mode, weights, seed),
            mode,
            block_size,
            instances,
            overlaps: Vec::new(),
            cands: Vec::with_capacity(instances),
            route_ns: 0,
            routes: 0,
        }
    }

    /// Mean wall time of a routing decision, in microseconds.
    pub fn route_us_mean(&self) -> f64 {
        self.route_ns as f64 / 1e3 / self.routes.max(1) as f64
    }
}

impl SimRouter for RouterSim {
    fn route(&mut self, _now: f64, req_id: u64, prompt: &[u32]) -> usize {
        let t0 = Instant::now();
        let req = RouteRequest {
            prompt_tokens: prompt.len(),
            block_size: self.block_size,
        };
        self.overlaps.clear();
        if self.mode == RouterMode::Kv {
            let hashes = tokens::block_hashes(prompt, self.block_size);
            self.index.overlaps(&hashes, &mut self.overlaps);
        }
        self.cands.clear();
        for i in 0..self.instances as u64 {
            self.cands.push(Candidate {
                instance: i,
                overlap_blocks: 0,
                load: self.active.load(i),
            });
        }
        for &(i, n) in &self.overlaps {
            self.cands[i as usize].overlap_blocks = n;
        }
        let pick = self
            .selector
            .select(&self.cands, &req)
            .expect("instances exist");
        let overlap = self.cands[pick].overlap_blocks;
        self.active
            .add(req_id, pick as u64, req.blocks(), req.new_tokens(overlap));
        self.route_ns += t0.elapsed().as_nanos();
        self.routes += 1;
        pick
    }

    fn on_kv_events(&mut self, instance: usize, events: &[KvEvent]) {
        for ev in events {
            // In one process nothing is lost: a gap here would be a bug.
            self.index
                .apply(instance as u64, ev)
                .expect("simulated events arrive in order");
        }
    }

    fn on_first_token(&mut self, _instance: usize, req_id: u64) {
        self.active.prefill_done(req_id);
    }

    fn on_finish(&mut self, _instance: usize, req_id: u64) {
        self.active.finish(req_id);
    }
}

pub fn run(opts: &SimBenchOptions) -> Result<SimBenchReport> {
    if opts.instances == 0 {
        bail!("--instances must be at least 1");
    }
    if opts.modes.is_empty() {
        bail!("--router-modes names no mode");
    }
    let sim = Simulator::uniform(&opts.instance, opts.instances).context("the mock instances")?;
    let vocab = opts
        .instance
        .output_vocab
        .unwrap_or(opts.instance.vocab_size) as u32;
    let block_size = opts.instance.scheduler.block_size;

    let (mut requests, rate, capacity) = match &opts.workload {
        SimWorkload::SharedPrefix {
            requests,
            groups,
            prefix_tokens,
            suffix_tokens,
            max_tokens,
        } => {
            let make = |rate: f64| {
                SharedPrefixWorkload {
                    num_requests: *requests,
                    num_groups: *groups,
                    prefix_tokens: *prefix_tokens,
                    suffix_tokens: *suffix_tokens,
                    max_tokens: *max_tokens,
                    rate_per_s: rate,
                    vocab_size: vocab,
                    seed: opts.seed,
                }
                .generate()
                .0
            };
            match opts.load {
                SimLoad::Rate(r) => (make(r), Some(r), None),
                SimLoad::CapacityFraction(f) => {
                    // Every request at time 0 under round-robin: the rate it drains at.
                    let burst = make(0.0);
                    let mut rr = RouterSim::new(
                        RouterMode::RoundRobin,
                        opts.weights,
                        opts.instances,
                        block_size,
                        opts.seed,
                    );
                    let r = sim.run(&burst, &mut rr).context("the capacity run")?;
                    let cap = burst.len() as f64 / r.makespan_s;
                    (make(cap * f), Some(cap * f), Some(cap))
                }
            }
        }
        SimWorkload::Mooncake { trace, options } => {
            let items = load_mooncake(trace, options, vocab)?;
            let reqs: Vec<SimRequest> = items
                .into_iter()
                .map(|w| SimRequest {
                    arrival_s: w.arrival_s.unwrap_or(0.0),
                    prompt: w.prompt,
                    max_tokens: w.max_tokens,
                })
                .collect();
            (reqs, None, None)
        }
    };
    // A trace can hold prompts longer than an instance accepts; they would be refused.
    let limit = opts
        .instance
        .max_model_len
        .min(opts.instance.scheduler.num_blocks * block_size);
    let before = requests.len();
    requests.retain(|r| r.prompt.len() + r.max_tokens as usize <= limit);
    if requests.len() < before {
        eprintln!(
            "note: {} of {before} requests exceed an instance's {limit}-token limit and are left out",
            before - requests.len()
        );
    }
    if requests.is_empty() {
        bail!("no request fits an instance ({limit} tokens of context and KV cache)");
    }

    let mut results = Vec::new();
    for &mode in &opts.modes {
        let mut router = RouterSim::new(mode, opts.weights, opts.instances, block_size, opts.seed);
        let t0 = Instant::now();
        let r = sim
            .run(&requests, &mut router)
            .with_context(|| format!("simulating {}", mode.name()))?;
        let wall_s = t0.elapsed().as_secs_f64();
        results.push(summarize(mode, &r, &router, opts, wall_s));
    }
    Ok(SimBenchReport {
        workload: opts.workload.clone(),
        instances: opts.instances,
        kv_blocks_per_instance: opts.instance.scheduler.num_blocks,
        block_size,
        requests: requests.len(),
        mean_prompt_tokens: requests.iter().map(|r| r.prompt.len() as f64).sum::<f64>()
            / requests.len() as f64,
        rate_per_s: rate,
        capacity_per_s: capacity,
        slo_ttft_s: opts.slo_ttft_s,
        slo_itl_s: opts.slo_itl_s,
        results,
    })
}

fn summarize(
    mode: RouterMode,
    r: &SimReport,
    router: &RouterSim,
    opts: &SimBenchOptions,
    wall_s: f64,
) -> ModeResult {
    let met = r
        .requests
        .iter()
        .filter(|q| {
            q.error.is_none()
                && q.ttft_s.is_some_and(|t| t <= opts.slo_ttft_s)
                && q.itl_max_s.is_none_or(|t| t <= opts.slo_itl_s)
        })
        .count();
    let n = r.requests.len().max(1) as f64;
    let span = r.makespan_s.max(f64::MIN_POSITIVE);
    ModeResult {
        mode: mode.name(),
        ttft_p50_s: r.ttft.p50,
        ttft_p90_s: r.ttft.p90,
        ttft_p99_s: r.ttft.p99,
        itl_p50_s: r.itl.p50,
        itl_p99_s: r.itl.p99,
        e2e_p50_s: r.e2e.p50,
        throughput_tok_s: r.throughput_tok_s,
        requests_per_s: r.requests.len() as f64 / span,
        prefix_hit_rate: r.prefix_hit_rate,
        goodput_fraction: met as f64 / n,
        goodput_requests_per_s: met as f64 / span,
        makespan_s: r.makespan_s,
        preemptions: r.instances.iter().map(|i| i.preemptions).sum(),
        rejected: r.rejected,
        per_instance: r.instances.iter().map(|i| i.requests).collect(),
        route_us_mean: router.route_us_mean(),
        wall_s,
    }
}

/// Loads a profile for `--profile`.
pub fn profile_cost(path: &std::path::Path) -> Result<StepCost> {
    Ok(StepCost::Profile(Profile::load(path)?))
}

pub fn print_table(r: &SimBenchReport) {
    println!(
        "{} instances × {} KV blocks of {} tokens; {} requests, mean prompt {:.0} tokens{}{}",
        r.instances,
        r.kv_blocks_per_instance,
        r.block_size,
        r.requests,
        r.mean_prompt_tokens,
        r.rate_per_s
            .map(|x| format!(", arrivals {x:.2}/s"))
            .unwrap_or_else(|| ", trace arrival times".into()),
        r.capacity_per_s
            .map(|c| format!(" (capacity {c:.2}/s under round-robin)"))
            .unwrap_or_default(),
    );
    println!(
        "{:<13} {:>9} {:>9} {:>9} {:>8} {:>8} {:>10} {:>7} {:>8} {:>8} {:>8}",
        "mode",
        "TTFT p50",
        "TTFT p90",
        "TTFT p99",
        "ITL p50",
        "ITL p99",
        "out tok/s",
        "hit %",
        "goodput",
        "preempt",
        "route µs"
    );
    for m in &r.results {
        println!(
            "{:<13} {:>8.3}s {:>8.3}s {:>8.3}s {:>6.1}ms {:>6.1}ms {:>10.0} {:>6.1}% {:>7.1}% {:>8} {:>8.1}",
            m.mode,
            m.ttft_p50_s,
            m.ttft_p90_s,
            m.ttft_p99_s,
            m.itl_p50_s * 1e3,
            m.itl_p99_s * 1e3,
            m.throughput_tok_s,
            m.prefix_hit_rate * 100.0,
            m.goodput_fraction * 100.0,
            m.preemptions,
            m.route_us_mean,
        );
    }
    println!(
        "goodput: requests with TTFT ≤ {:.0} ms and every inter-token gap ≤ {:.0} ms",
        r.slo_ttft_s * 1e3,
        r.slo_itl_s * 1e3
    );
}
