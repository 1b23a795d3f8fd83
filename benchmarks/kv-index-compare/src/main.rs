//! Switchyard's KV index against Dynamo's radix tree (dynamo-kv-router 1.6.1) on one event
//! stream: events applied per second, lookup latency, memory. Every (index, instances) cell
//! runs in a fresh child process (this binary with `--cell`), so that one index's freed
//! memory never flatters the next one's RSS. See README.md.

mod alloc;
mod cell;
mod switchyard_index;
mod workload;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;

use cell::{CellResult, IndexKind};
use workload::{Params, Workload};

/// An engine instance's id (the crate root of the index source compiled in
/// `switchyard_index` expects it here).
pub type InstanceId = u64;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

#[derive(Debug, Parser)]
#[command(about = "Compare Switchyard's KV index with Dynamo's radix tree")]
struct Args {
    /// Instance counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "64,1024")]
    instances: Vec<usize>,
    /// Blocks per shared prefix group.
    #[arg(long, default_value_t = 64)]
    depth: usize,
    /// Distinct shared prefix groups.
    #[arg(long, default_value_t = 32)]
    prefixes: usize,
    /// Groups each instance caches (its share of the prefixes).
    #[arg(long, default_value_t = 8)]
    groups_per_instance: usize,
    /// KV events in the stream (over all instances).
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Lookups, each timed on its own.
    #[arg(long, default_value_t = 20_000)]
    queries: usize,
    /// Tokens per block (only feeds the hash functions).
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Share of events that evict blocks.
    #[arg(long, default_value_t = 0.15)]
    remove_frac: f64,
    /// Blocks after the shared prefix in each query, held by nobody.
    #[arg(long, default_value_t = 4)]
    extra_blocks: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Runs of each cell (each a fresh process); timings are the median over runs.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Indexes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "switchyard,dynamo")]
    index: Vec<IndexKind>,
    /// Read each query into the cache just before its timed lookup, as a router's freshly
    /// hashed prompt is. Without it the 20k queries, built before the clock starts, are
    /// read cold from memory by the timed lookup. The index's own data is left as it is.
    #[arg(long)]
    warm_queries: bool,
    /// Also write the results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: measure one cell (one index, one instance count) and print it as JSON.
    #[arg(long, hide = true)]
    cell: bool,
}

impl Args {
    fn params(&self, instances: usize) -> Params {
        Params {
            instances,
            depth: self.depth,
            prefixes: self.prefixes,
            groups_per_instance: self.groups_per_instance,
            events: self.events,
            queries: self.queries,
            block_size: self.block_size,
            remove_frac: self.remove_frac,
            extra_blocks: self.extra_blocks,
            seed: self.seed,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.instances.is_empty() || self.instances.contains(&0) {
            bail!("--instances: give one or more positive counts");
        }
        if self.depth == 0 || self.depth > usize::from(u16::MAX) {
            bail!("--depth: must be within 1..=65535");
        }
        if self.prefixes == 0 || self.groups_per_instance == 0 {
            bail!("--prefixes and --groups-per-instance must be positive");
        }
        if self.block_size == 0 {
            bail!("--block-size must be positive");
        }
        if !(0.0..=1.0).contains(&self.remove_frac) {
            bail!("--remove-frac must be within 0..=1");
        }
        if self.repeat == 0 {
            bail!("--repeat must be positive");
        }
        Ok(())
    }
}

#[derive(Serialize)]
struct Report {
    command: String,
    unix_time: u64,
    load_before: String,
    load_after: String,
    cpus: usize,
    depth: usize,
    prefixes: usize,
    groups_per_instance: usize,
    events: usize,
    queries: usize,
    block_size: usize,
    remove_frac: f64,
    extra_blocks: usize,
    seed: u64,
    repeat: usize,
    warm_queries: bool,
    cells: Vec<CellResult>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    args.validate()?;
    if args.cell {
        let [instances] = args.instances[..] else {
            bail!("--cell takes exactly one instance count");
        };
        let [kind] = args.index[..] else {
            bail!("--cell takes exactly one index");
        };
        let workload = Workload::generate(&args.params(instances));
        let result = cell::run(kind, &workload, args.warm_queries);
        println!("{}", serde_json::to_string(&result)?);
        return Ok(());
    }

    let load_before = loadavg();
    print_header();
    let mut cells = Vec::new();
    for &instances in &args.instances {
        for &kind in &args.index {
            let runs = (0..args.repeat)
                .map(|_| run_child(&args, kind, instances))
                .collect::<Result<Vec<_>>>()
                .with_context(|| format!("cell {kind:?} with {instances} instances"))?;
            let result = cell::median(runs);
            print_row(&result, &cells);
            cells.push(result);
        }
    }
    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        load_before,
        load_after: loadavg(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        depth: args.depth,
        prefixes: args.prefixes,
        groups_per_instance: args.groups_per_instance,
        events: args.events,
        queries: args.queries,
        block_size: args.block_size,
        remove_frac: args.remove_frac,
        extra_blocks: args.extra_blocks,
        seed: args.seed,
        repeat: args.repeat,
        warm_queries: args.warm_queries,
        cells,
    };
    println!(
        "load average before {} / after {}",
        report.load_before, report.load_after
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn run_child(args: &Args, kind: IndexKind, instances: usize) -> Result<CellResult> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let kind_name = kind_name(kind);
    let output = Command::new(exe)
        .arg("--cell")
        .args(["--index", kind_name])
        .args(["--instances", &instances.to_string()])
        .args(["--depth", &args.depth.to_string()])
        .args(["--prefixes", &args.prefixes.to_string()])
        .args([
            "--groups-per-instance",
            &args.groups_per_instance.to_string(),
        ])
        .args(["--events", &args.events.to_string()])
        .args(["--queries", &args.queries.to_string()])
        .args(["--block-size", &args.block_size.to_string()])
        .args(["--remove-frac", &args.remove_frac.to_string()])
        .args(["--extra-blocks", &args.extra_blocks.to_string()])
        .args(["--seed", &args.seed.to_string()])
        .args(args.warm_queries.then_some("--warm-queries"))
        .output()
        .context("starting the cell process")?;
    if !output.status.success() {
        bail!(
            "cell process failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8(output.stdout).context("cell output is not UTF-8")?;
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("parsing cell output {line:?}"))
}

fn print_header() {
    println!(
        "{:<10} {:>5} {:>9} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6}",
        "index",
        "inst",
        "entries",
        "events/s",
        "blocks/s",
        "p50 us",
        "p99 us",
        "mean us",
        "heap MiB",
        "rss MiB",
        "est MiB",
        "same"
    );
}

/// `same`: whether every lookup gave the same result as the first index measured with this
/// instance count.
fn print_row(r: &CellResult, earlier: &[CellResult]) {
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    let same = earlier
        .iter()
        .find(|e| e.instances == r.instances && e.index != IndexKind::Floor)
        .filter(|_| r.index != IndexKind::Floor)
        .map_or("-", |e| {
            if e.result_digest == r.result_digest && e.entries == r.entries {
                "yes"
            } else {
                "NO"
            }
        });
    let est = r
        .estimated_bytes
        .map_or_else(|| "-".to_string(), |b| format!("{:.1}", mib(b)));
    let kind = kind_name(r.index);
    println!(
        "{:<10} {:>5} {:>9} {:>10.0} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.1} {:>8.1} {:>8} {:>6}",
        kind,
        r.instances,
        r.entries,
        r.events_per_sec,
        r.blocks_per_sec,
        r.lookup_p50_ns as f64 / 1000.0,
        r.lookup_p99_ns as f64 / 1000.0,
        r.lookup_mean_ns / 1000.0,
        mib(r.heap_bytes),
        mib(r.rss_bytes),
        est,
        same
    );
    if r.apply_errors > 0 {
        println!("  ({} events rejected by {kind})", r.apply_errors);
    }
}

fn kind_name(kind: IndexKind) -> &'static str {
    match kind {
        IndexKind::Switchyard => "switchyard",
        IndexKind::Dynamo => "dynamo",
        IndexKind::Floor => "floor",
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
