//! The cluster simulator on a small shared-prefix workload.

use std::collections::HashMap;
use std::time::Instant;

use engine::core::{FinishReason, SchedulerConfig};
use mocker::sim::workload::SharedPrefixWorkload;
use mocker::sim::{RoundRobin, SimReport, SimRequest, SimRouter, Simulator};
use mocker::{CostModel, MockOptions, StepCost};
use protocol::KvEvent;

const INSTANCES: usize = 4;

fn options() -> MockOptions {
    MockOptions {
        scheduler: SchedulerConfig {
            block_size: 16,
            num_blocks: 1024,
            ..SchedulerConfig::default()
        },
        ..MockOptions::default()
    }
}

fn workload() -> (Vec<SimRequest>, Vec<usize>) {
    let (mut reqs, groups) = SharedPrefixWorkload {
        num_requests: 200,
        num_groups: 16,
        prefix_tokens: 512,
        suffix_tokens: 64,
        max_tokens: 0,
        rate_per_s: 40.0,
        vocab_size: 32_000,
        seed: 11,
    }
    .generate();
    for (i, r) in reqs.iter_mut().enumerate() {
        r.max_tokens = 8 + (i as u32 * 7) % 40;
    }
    (reqs, groups)
}

/// Sends each prefix group to one instance, chosen in turn as groups first appear.
struct StickyGroups {
    by_prefix: HashMap<Vec<u32>, usize>,
    first_tokens: usize,
    kv_events: usize,
    first_token_calls: usize,
    finish_calls: usize,
}

impl SimRouter for StickyGroups {
    fn route(&mut self, _now: f64, _req_id: u64, prompt: &[u32]) -> usize {
        let n = self.by_prefix.len();
        *self
            .by_prefix
            .entry(prompt[..self.first_tokens].to_vec())
            .or_insert(n % INSTANCES)
    }

    fn on_kv_events(&mut self, _instance: usize, events: &[KvEvent]) {
        self.kv_events += events.len();
    }

    fn on_first_token(&mut self, _instance: usize, _req_id: u64) {
        self.first_token_calls += 1;
    }

    fn on_finish(&mut self, _instance: usize, _req_id: u64) {
        self.finish_calls += 1;
    }
}

fn sticky() -> StickyGroups {
    StickyGroups {
        by_prefix: HashMap::new(),
        first_tokens: 16,
        kv_events: 0,
        first_token_calls: 0,
        finish_calls: 0,
    }
}

/// `costs[i]` is instance i's step cost.
fn check_complete(report: &SimReport, reqs: &[SimRequest], costs: &[StepCost]) {
    assert_eq!(report.requests.len(), reqs.len());
    assert_eq!(report.rejected, 0);
    for (rec, req) in report.requests.iter().zip(reqs) {
        assert_eq!(rec.output_tokens, req.max_tokens, "request {}", rec.req_id);
        assert_eq!(rec.finish_reason, Some(FinishReason::Length));
        // The first token needs at least the prefill of the uncached prompt on its own.
        let new = (rec.prompt_tokens - rec.cached_prompt_tokens) as usize;
        let prefill = costs[rec.instance].step_seconds_of([(new, rec.prompt_tokens as usize)]);
        let ttft = rec.ttft_s.expect("a first token");
        assert!(ttft + 1e-12 >= prefill, "ttft {ttft} < prefill {prefill}");
        assert!(rec.e2e_s.unwrap() >= ttft);
        if rec.output_tokens > 1 {
            assert!(rec.itl_mean_s.unwrap() > 0.0);
        }
    }
    let counted: u64 = report.instances.iter().map(|i| i.requests).sum();
    assert_eq!(counted, reqs.len() as u64);
    assert!(report.ttft.p50 <= report.ttft.p90 && report.ttft.p90 <= report.ttft.p99);
    assert!(report.itl.p50 <= report.itl.p99);
    assert!(report.makespan_s > 0.0 && report.throughput_tok_s > 0.0);
}

#[test]
fn shared_prefix_groups_hit_more_when_kept_together() {
    let (reqs, _) = workload();
    let sim = Simulator::uniform(&options(), INSTANCES).unwrap();
    let costs = vec![StepCost::Model(CostModel::default()); INSTANCES];

    let t = Instant::now();
    let rr = sim.run(&reqs, &mut RoundRobin::new(INSTANCES)).unwrap();
    let elapsed = t.elapsed();
    let mut router = sticky();
    let grouped = sim.run(&reqs, &mut router).unwrap();
    eprintln!(
        "4 instances × 200 requests: {elapsed:?} per run\nround robin:\n{rr}\ngrouped:\n{grouped}"
    );

    check_complete(&rr, &reqs, &costs);
    check_complete(&grouped, &reqs, &costs);
    assert_eq!(
        rr.instances.iter().map(|i| i.requests).collect::<Vec<_>>(),
        vec![50; INSTANCES]
    );
    assert!(
        grouped.prefix_hit_rate > rr.prefix_hit_rate,
        "grouped {} vs round robin {}",
        grouped.prefix_hit_rate,
        rr.prefix_hit_rate
    );
    assert!(router.kv_events > 0);
    assert_eq!(router.first_token_calls, reqs.len());
    assert_eq!(router.finish_calls, reqs.len());
}

#[test]
fn the_same_input_gives_the_same_report() {
    let (reqs, _) = workload();
    let sim = Simulator::uniform(&options(), INSTANCES).unwrap();
    let a = sim.run(&reqs, &mut sticky()).unwrap();
    let b = sim.run(&reqs, &mut sticky()).unwrap();
    assert_eq!(a, b);
}

#[test]
fn a_busy_instance_takes_new_requests_at_its_next_step() {
    // One instance, no base cost: a 1000-token prompt at t=0, a 1-token-decode request at
    // t=1 ms, while the first prefill (50 ms) is still running.
    let opts = MockOptions {
        cost: StepCost::Model(CostModel {
            step_base_s: 0.0,
            prefill_attn_pair_s: 0.0,
            ..CostModel::default()
        }),
        ..options()
    };
    let sim = Simulator::uniform(&opts, 1).unwrap();
    let reqs = vec![
        SimRequest {
            arrival_s: 0.0,
            prompt: (1..=1000).collect(),
            max_tokens: 3,
        },
        SimRequest {
            arrival_s: 0.001,
            prompt: (2000..2100).collect(),
            max_tokens: 1,
        },
    ];
    let r = sim.run(&reqs, &mut RoundRobin::new(1)).unwrap();
    let first = 1000.0 / 20_000.0;
    assert!((r.requests[0].ttft_s.unwrap() - first).abs() < 1e-12);
    // The second waits for the first step, then shares the next with a decode.
    let second_step = 100.0 / 20_000.0
        + CostModel::default().decode_per_seq_s
        + CostModel::default().decode_per_kv_token_s * 1001.0;
    let want = first + second_step - 0.001;
    assert!((r.requests[1].ttft_s.unwrap() - want).abs() < 1e-12);
}

#[test]
fn refused_requests_and_bad_routes_are_reported() {
    let opts = MockOptions {
        max_model_len: 64,
        ..options()
    };
    let sim = Simulator::uniform(&opts, 2).unwrap();
    let reqs = vec![SimRequest {
        arrival_s: 0.0,
        prompt: vec![5; 100],
        max_tokens: 4,
    }];
    let r = sim.run(&reqs, &mut RoundRobin::new(2)).unwrap();
    assert_eq!(r.rejected, 1);
    assert!(r.requests[0].error.as_deref().unwrap().contains("prompt"));

    struct Off;
    impl SimRouter for Off {
        fn route(&mut self, _: f64, _: u64, _: &[u32]) -> usize {
            7
        }
        fn on_kv_events(&mut self, _: usize, _: &[KvEvent]) {}
        fn on_first_token(&mut self, _: usize, _: u64) {}
        fn on_finish(&mut self, _: usize, _: u64) {}
    }
    let err = sim.run(&reqs, &mut Off).unwrap_err().to_string();
    assert!(err.contains("instance 7"), "{err}");
}

#[test]
fn instances_may_differ_and_use_a_measured_profile() {
    let profile = mocker::Profile::from_json_str(
        r#"{"prefill": [{"new_tokens": 1, "seconds": 0.01}, {"new_tokens": 2048, "seconds": 0.2}],
            "decode": [{"batch_size": 1, "kv_tokens": 0, "seconds": 0.01},
                       {"batch_size": 64, "kv_tokens": 100000, "seconds": 0.03}]}"#,
        "inline",
    )
    .unwrap();
    let slow = MockOptions {
        cost: StepCost::Profile(profile.clone()),
        ..options()
    };
    let sim = Simulator::new(vec![slow, options()]).unwrap();
    let (reqs, _) = workload();
    let r = sim.run(&reqs[..40], &mut RoundRobin::new(2)).unwrap();
    check_complete(
        &r,
        &reqs[..40],
        &[StepCost::Profile(profile), StepCost::default()],
    );
    // The profiled instance (10 ms floor) is slower per token than the default (7 ms).
    let itl = |inst: usize| {
        let v: Vec<f64> = r
            .requests
            .iter()
            .filter(|q| q.instance == inst)
            .filter_map(|q| q.itl_mean_s)
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    assert!(itl(0) > itl(1));
}
