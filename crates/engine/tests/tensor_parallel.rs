//! Tensor parallelism emulated on the CPU: TP=2 and TP=4 shards of each architecture give
//! the same greedy tokens as TP=1 and log-probabilities within tolerance.

mod common;

use common::*;
use engine::core::{GenerateRequest, LlmEngine, SamplingParams};
use engine::model::{build_cpu_tp_engine, EngineOptions};

fn request(p: Vec<u32>) -> GenerateRequest {
    GenerateRequest {
        prompt: p,
        sampling: SamplingParams {
            temperature: 0.0,
            logprobs: Some(5),
            ..SamplingParams::default()
        },
        max_tokens: 16,
        stop_token_ids: vec![],
        ignore_eos: true,
    }
}

/// Per sequence: each generated token with its top logprobs.
type Trace = Vec<Vec<(u32, Vec<(u32, f32)>)>>;

fn run_tp<E: engine::core::Executor>(e: &mut LlmEngine<E>, prompts: &[Vec<u32>]) -> Trace {
    for (i, p) in prompts.iter().enumerate() {
        e.validate(&request(p.clone())).unwrap();
        e.add_request(i as u64, request(p.clone()));
    }
    let mut out = vec![Vec::new(); prompts.len()];
    while e.has_work() {
        for (id, ev) in e.step() {
            if let Some(t) = ev.token {
                out[id as usize].push((t, ev.top_logprobs));
            }
        }
    }
    out
}

fn opts() -> EngineOptions {
    EngineOptions {
        num_blocks: Some(64),
        ..EngineOptions::default()
    }
}

#[test]
fn tp_shards_match_a_single_device() {
    for arch in ARCHS {
        let dir = synth_tiny(arch, synth::DType::F32, 5);
        let prompts: Vec<Vec<u32>> = (0..3)
            .map(|i| prompt(30 + i, 9 + 13 * i as usize, 512))
            .collect();
        let mut single = build_cpu_tp_engine(dir.path(), 1, &opts(), &mut |_, _| {}).unwrap();
        let want = run_tp(&mut single, &prompts);
        for world in [2, 4] {
            let mut tp = build_cpu_tp_engine(dir.path(), world, &opts(), &mut |_, _| {}).unwrap();
            let got = run_tp(&mut tp, &prompts);
            for (s, (a, b)) in want.iter().zip(&got).enumerate() {
                let ta: Vec<u32> = a.iter().map(|x| x.0).collect();
                let tb: Vec<u32> = b.iter().map(|x| x.0).collect();
                assert_eq!(
                    ta,
                    tb,
                    "{} tp={world} sequence {s}: tokens",
                    arch_name(arch)
                );
                for (step, ((_, la), (_, lb))) in a.iter().zip(b).enumerate() {
                    for ((ia, va), (ib, vb)) in la.iter().zip(lb) {
                        assert_eq!(
                            ia,
                            ib,
                            "{} tp={world} step {step}: top ids",
                            arch_name(arch)
                        );
                        assert!(
                            (va - vb).abs() < 1e-4,
                            "{} tp={world}: logprob {va} vs {vb}",
                            arch_name(arch)
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn tp_refuses_impossible_splits() {
    let dir = synth_tiny(synth::Arch::Llama, synth::DType::F32, 5);
    // 4 heads cannot be split 3 ways.
    let err = build_cpu_tp_engine(dir.path(), 3, &opts(), &mut |_, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("--tp 3") && err.contains("attention heads"),
        "{err}"
    );
}
