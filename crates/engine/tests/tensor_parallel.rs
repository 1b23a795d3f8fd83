//! Tensor parallelism emulated on the CPU: TP=2 and TP=4 shards of each architecture give
//! the same greedy tokens as TP=1 and log-probabilities within tolerance.

mod common;

use common::*;
use engine::core::{Executor, GenerateRequest, LlmEngine, SamplingParams};
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

/// Cuts a checkpoint's vocabulary to its first `vocab` ids (config, embedding, output
/// layer), so that it does not split evenly over the ranks.
fn shrink_vocab(dir: &std::path::Path, vocab: usize) {
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["vocab_size"] = vocab.into();
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();

    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> = Vec::new();
    for (name, t) in st.tensors() {
        let mut shape = t.shape().to_vec();
        let mut data = t.data().to_vec();
        if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
            data.truncate(data.len() / shape[0] * vocab);
            shape[0] = vocab;
        }
        tensors.push((name, shape, t.dtype(), data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, shape, dtype, data)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

/// A vocabulary that does not split evenly: the last rank's share of the output layer is
/// padded, and the padding never reaches the logits. Llama's tiny model ties its output
/// layer to the embedding, Mistral's does not.
#[test]
fn tp_output_layer_splits_an_uneven_vocabulary() {
    for arch in [synth::Arch::Llama, synth::Arch::Mistral] {
        let dir = synth_tiny(arch, synth::DType::F32, 7);
        shrink_vocab(dir.path(), 509);
        let prompts: Vec<Vec<u32>> = (0..2).map(|i| prompt(40 + i, 11, 509)).collect();
        let mut single = build_cpu_tp_engine(dir.path(), 1, &opts(), &mut |_, _| {}).unwrap();
        let want = run_tp(&mut single, &prompts);
        for world in [2, 4] {
            let mut tp = build_cpu_tp_engine(dir.path(), world, &opts(), &mut |_, _| {}).unwrap();
            assert_eq!(tp.executor().vocab_size(), 509);
            let got = run_tp(&mut tp, &prompts);
            for (a, b) in want.iter().zip(&got) {
                for ((ta, la), (tb, lb)) in a.iter().zip(b) {
                    assert_eq!(ta, tb, "{} tp={world}: tokens", arch_name(arch));
                    assert!(*ta < 509);
                    for ((ia, va), (ib, vb)) in la.iter().zip(lb) {
                        assert_eq!(ia, ib, "{} tp={world}: top ids", arch_name(arch));
                        assert!((va - vb).abs() < 1e-4, "{va} vs {vb}");
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
