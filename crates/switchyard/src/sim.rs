//! `switchyard bench sim`: the cluster simulator's command line (see `bench::sim_bench`).

use std::path::PathBuf;

use anyhow::{bail, Result};
use bench::sim_bench::{self as sb, SimLoad, SimWorkload};
use bench::workload::MooncakeOptions;
use engine::core::SchedulerConfig;
use mocker::{CostModel, MockOptions, StepCost};
use router::{KvWeights, RouterMode};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SimWorkloadArg {
    /// Groups sharing a long prefix (--groups, --prefix-tokens, --suffix-tokens).
    SharedPrefix,
    /// A Mooncake trace (--trace) at its own arrival times.
    Mooncake,
}

#[derive(clap::Args)]
pub struct BenchSimArgs {
    #[arg(long, value_enum, default_value_t = SimWorkloadArg::SharedPrefix)]
    workload: SimWorkloadArg,
    /// Simulated instances.
    #[arg(long, default_value_t = 16)]
    instances: usize,
    /// Routing modes to compare, each on the same requests.
    #[arg(long, value_delimiter = ',', default_value = "kv,round-robin", value_parser = parse_mode)]
    router_modes: Vec<RouterMode>,
    /// Weight of a block of prefill against a block of decode load.
    #[arg(long, default_value_t = 8.0)]
    router_overlap_weight: f64,
    #[arg(long, default_value_t = 0.0)]
    router_temperature: f64,
    /// Shared-prefix workload: requests, groups, and token counts.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    #[arg(long, default_value_t = 64)]
    groups: usize,
    #[arg(long, default_value_t = 4096)]
    prefix_tokens: usize,
    #[arg(long, default_value_t = 256)]
    suffix_tokens: usize,
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Shared-prefix workload: arrivals per second of virtual time...
    #[arg(long, conflicts_with = "load")]
    rate: Option<f64>,
    /// ...or as a fraction of the capacity measured under round-robin.
    #[arg(long, default_value_t = 0.7)]
    load: f64,
    /// Mooncake workload: the JSONL trace.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Mooncake workload: arrival times are divided by this.
    #[arg(long, default_value_t = 1.0)]
    speedup: f64,
    /// Mooncake workload: tokens per 512-token trace block (512 replays at full size).
    #[arg(long, default_value_t = 512)]
    trace_block_tokens: usize,
    #[arg(long)]
    max_requests: Option<usize>,
    #[arg(long)]
    max_output_tokens: Option<u32>,
    /// KV blocks per instance (default: what an 8B model leaves on an H100).
    #[arg(long)]
    kv_blocks: Option<usize>,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    #[arg(long, default_value_t = 8192)]
    max_batched_tokens: usize,
    /// A measured step-time profile (JSON) instead of the built-in H100 8B cost model.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Goodput SLOs.
    #[arg(long, default_value_t = 2000.0)]
    slo_ttft_ms: f64,
    #[arg(long, default_value_t = 100.0)]
    slo_itl_ms: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn parse_mode(s: &str) -> Result<RouterMode, String> {
    s.parse()
}

pub fn bench_sim(args: BenchSimArgs) -> Result<()> {
    let positive = |name: &str, v: f64| -> Result<()> {
        if !(v.is_finite() && v > 0.0) {
            bail!("{name} must be a positive number, got {v}");
        }
        Ok(())
    };
    positive("--speedup", args.speedup)?;
    positive("--slo-ttft-ms", args.slo_ttft_ms)?;
    positive("--slo-itl-ms", args.slo_itl_ms)?;
    if let Some(r) = args.rate {
        positive("--rate", r)?;
    }
    if !(args.load > 0.0 && args.load <= 10.0) {
        bail!("--load must be in (0, 10], got {}", args.load);
    }
    if args.block_size == 0 || args.trace_block_tokens == 0 {
        bail!("--block-size and --trace-block-tokens must be at least 1");
    }
    let workload = match args.workload {
        SimWorkloadArg::SharedPrefix => {
            if args.trace.is_some() {
                bail!("--trace applies to --workload mooncake");
            }
            SimWorkload::SharedPrefix {
                requests: args.requests,
                groups: args.groups,
                prefix_tokens: args.prefix_tokens,
                suffix_tokens: args.suffix_tokens,
                max_tokens: args.max_tokens,
            }
        }
        SimWorkloadArg::Mooncake => {
            let Some(trace) = args.trace.clone() else {
                bail!("--workload mooncake needs --trace PATH");
            };
            SimWorkload::Mooncake {
                trace,
                options: MooncakeOptions {
                    block_tokens: args.trace_block_tokens,
                    speedup: args.speedup,
                    max_requests: args.max_requests,
                    max_output_tokens: args.max_output_tokens,
                },
            }
        }
    };
    let defaults = MockOptions::default();
    let instance = MockOptions {
        scheduler: SchedulerConfig {
            block_size: args.block_size,
            num_blocks: args.kv_blocks.unwrap_or(defaults.scheduler.num_blocks),
            max_num_seqs: args.max_num_seqs,
            max_batched_tokens: args.max_batched_tokens,
            enable_prefix_caching: true,
        },
        cost: match &args.profile {
            Some(p) => sb::profile_cost(p)?,
            None => StepCost::Model(CostModel::default()),
        },
        // Contexts as long as the cache allows: traces hold very long prompts.
        max_model_len: 1 << 20,
        ..defaults
    };
    let opts = sb::SimBenchOptions {
        workload,
        load: match args.rate {
            Some(r) => SimLoad::Rate(r),
            None => SimLoad::CapacityFraction(args.load),
        },
        instances: args.instances,
        modes: args.router_modes,
        weights: KvWeights {
            overlap_weight: args.router_overlap_weight,
            temperature: args.router_temperature,
        },
        instance,
        slo_ttft_s: args.slo_ttft_ms / 1e3,
        slo_itl_s: args.slo_itl_ms / 1e3,
        seed: args.seed,
    };
    let report = sb::run(&opts)?;
    sb::print_table(&report);
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
