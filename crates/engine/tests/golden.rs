//! Logits and greedy tokens against Hugging Face transformers, on tiny random f32 models
//! of every supported architecture. Fixtures come from scripts/golden/make_fixtures.py.

mod common;

use std::path::PathBuf;

use common::*;
use engine::backend::cpu::CpuBackend;
use engine::backend::{ForwardBatch, SeqSlice};
use engine::model::Model;
use serde_json::Value;

const SEED: u64 = 7;
const MAX_REL_ERR: f32 = 1e-4;

fn fixture(arch: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("golden_{arch}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture is JSON")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Logits of every prompt position from one prefill step through the paged cache.
fn all_position_logits(
    dir: &std::path::Path,
    prompt: &[u32],
    block_size: usize,
) -> (Vec<f32>, usize) {
    let backend = CpuBackend::new();
    let model = Model::load(dir, &backend, &mut |_, _| {}).expect("load");
    let vocab = model.config().vocab_size;
    let blocks = prompt.len().div_ceil(block_size);
    // Scatter the sequence over non-contiguous blocks so the block table is exercised.
    let table: Vec<u32> = (0..blocks as u32).map(|b| 2 * b + 1).collect();
    let spec = model.kv_cache_spec(2 * blocks + 2, block_size);
    let mut cache = engine::backend::Backend::alloc_kv_cache(&backend, &spec).expect("cache");
    let n = prompt.len();
    let batch = ForwardBatch {
        token_ids: prompt.to_vec(),
        positions: (0..n as u32).collect(),
        slots: (0..n)
            .map(|p| table[p / block_size] * block_size as u32 + (p % block_size) as u32)
            .collect(),
        seqs: vec![SeqSlice {
            q_start: 0,
            q_len: n,
            ctx_len: n,
            block_table: table,
        }],
        logit_rows: (0..n as u32).collect(),
        block_size,
    };
    let logits = model.forward(&backend, &mut cache, &batch);
    (engine::backend::Backend::to_host(&backend, &logits), vocab)
}

fn check_arch(arch: synth::Arch) {
    let name = arch_name(arch);
    let fx = fixture(name);
    let dir = synth_tiny(arch, synth::DType::F32, SEED);
    for (c, case) in fx["cases"].as_array().expect("cases").iter().enumerate() {
        let prompt = ids(&case["prompt_ids"]);
        let want: Vec<Vec<f32>> = case["logits"]
            .as_array()
            .expect("logits")
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect();
        assert_eq!(want.len(), prompt.len());
        let (got, vocab) = all_position_logits(dir.path(), &prompt, 16);
        for (p, want_row) in want.iter().enumerate() {
            let got_row = &got[p * vocab..(p + 1) * vocab];
            assert_eq!(want_row.len(), vocab);
            let scale = want_row.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = got_row
                .iter()
                .zip(want_row)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err / scale <= MAX_REL_ERR,
                "{name} case {c} position {p}: max abs err {err} vs scale {scale}"
            );
        }

        let want_greedy = ids(&case["greedy_ids"]);
        let mut eng = engine(dir.path(), opts(64, 16));
        let out = run_all(
            &mut eng,
            vec![greedy(prompt.clone(), want_greedy.len() as u32)],
            1,
        );
        assert_eq!(
            out[0].tokens, want_greedy,
            "{name} case {c}: greedy tokens differ"
        );
    }
}

#[test]
fn llama_matches_transformers() {
    check_arch(synth::Arch::Llama);
}

#[test]
fn mistral_matches_transformers() {
    check_arch(synth::Arch::Mistral);
}

#[test]
fn qwen2_matches_transformers() {
    check_arch(synth::Arch::Qwen2);
}

#[test]
fn qwen3_matches_transformers() {
    check_arch(synth::Arch::Qwen3);
}
