//! How fast the simulator runs: wall time of shared-prefix workloads on a few cluster
//! sizes, with round-robin routing, as a table.
//!
//! `cargo run --release -p switchyard-mocker --example sim_scale [INSTANCES REQUESTS RATE]`

use std::time::Instant;

use mocker::sim::workload::SharedPrefixWorkload;
use mocker::sim::{RoundRobin, Simulator};
use mocker::MockOptions;

fn main() {
    let args: Vec<f64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: INSTANCES REQUESTS RATE"))
        .collect();
    let cases: Vec<(usize, usize, f64)> = match args[..] {
        [n, r, rate] => vec![(n as usize, r as usize, rate)],
        _ => vec![(4, 200, 40.0), (16, 2000, 160.0), (64, 8000, 640.0)],
    };
    println!(
        "{:>9} {:>8} {:>9} {:>9} {:>11} {:>8} {:>10} {:>10} {:>8}",
        "instances",
        "requests",
        "rate/s",
        "wall_ms",
        "makespan_s",
        "steps",
        "ttft_p50",
        "ttft_p99",
        "hit_rate"
    );
    for (n, requests, rate) in cases {
        let (reqs, _) = SharedPrefixWorkload {
            num_requests: requests,
            num_groups: 4 * n,
            prefix_tokens: 1024,
            suffix_tokens: 256,
            max_tokens: 128,
            rate_per_s: rate,
            vocab_size: 32_000,
            seed: 1,
        }
        .generate();
        let sim = Simulator::uniform(&MockOptions::default(), n).expect("valid options");
        let t = Instant::now();
        let report = sim.run(&reqs, &mut RoundRobin::new(n)).expect("simulation");
        let wall = t.elapsed();
        let steps: u64 = report.instances.iter().map(|i| i.steps).sum();
        println!(
            "{:>9} {:>8} {:>9.0} {:>9.1} {:>11.2} {:>8} {:>9.1}ms {:>9.1}ms {:>7.1}%",
            n,
            requests,
            rate,
            wall.as_secs_f64() * 1e3,
            report.makespan_s,
            steps,
            report.ttft.p50 * 1e3,
            report.ttft.p99 * 1e3,
            report.prefix_hit_rate * 100.0
        );
    }
}
