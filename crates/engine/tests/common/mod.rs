//! Shared helpers for the engine's integration tests: tiny synthetic models and engines
//! over them.
#![allow(dead_code)]

use std::path::Path;

use engine::backend::cpu::CpuBackend;
use engine::core::{FinishReason, GenerateRequest, LlmEngine, RequestId, TokenEvent};
use engine::model::{build_engine, EngineOptions, ModelExecutor};

pub type CpuEngine = LlmEngine<ModelExecutor<CpuBackend>>;

pub const ARCHS: [synth::Arch; 4] = [
    synth::Arch::Llama,
    synth::Arch::Mistral,
    synth::Arch::Qwen2,
    synth::Arch::Qwen3,
];

pub fn arch_name(arch: synth::Arch) -> &'static str {
    match arch {
        synth::Arch::Llama => "llama",
        synth::Arch::Mistral => "mistral",
        synth::Arch::Qwen2 => "qwen2",
        synth::Arch::Qwen3 => "qwen3",
    }
}

/// A tiny random model in a temporary directory.
pub fn synth_tiny(arch: synth::Arch, dtype: synth::DType, seed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    synth::synthesize(&synth::SynthOptions {
        out: dir.path().to_path_buf(),
        arch,
        size: synth::Size::Tiny,
        dtype,
        seed,
        progress: false,
    })
    .expect("synthesize tiny model");
    dir
}

pub fn engine(dir: &Path, opts: EngineOptions) -> CpuEngine {
    build_engine(dir, CpuBackend::new(), &opts, &mut |_, _| {}).expect("load model")
}

pub fn opts(num_blocks: usize, block_size: usize) -> EngineOptions {
    EngineOptions {
        block_size,
        num_blocks: Some(num_blocks),
        ..EngineOptions::default()
    }
}

pub fn greedy(prompt: Vec<u32>, max_tokens: u32) -> GenerateRequest {
    let mut r = GenerateRequest::greedy(prompt, max_tokens);
    r.ignore_eos = true;
    r
}

/// Everything a request produced, gathered by running the engine to completion.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub tokens: Vec<u32>,
    pub finish: Option<FinishReason>,
    pub cached_prompt_tokens: u32,
    pub events: Vec<TokenEvent>,
}

/// Runs `reqs` together until all finish; outcomes in request order.
pub fn run_all(
    engine: &mut CpuEngine,
    reqs: Vec<GenerateRequest>,
    first_id: RequestId,
) -> Vec<Outcome> {
    let n = reqs.len();
    for (i, r) in reqs.into_iter().enumerate() {
        engine.validate(&r).expect("valid request");
        engine.add_request(first_id + i as RequestId, r);
    }
    let mut out = vec![Outcome::default(); n];
    let mut steps = 0;
    while engine.has_work() {
        steps += 1;
        assert!(steps < 100_000, "engine did not finish");
        for (id, ev) in engine.step() {
            let o = &mut out[(id - first_id) as usize];
            if let Some(t) = ev.token {
                o.tokens.push(t);
            }
            o.cached_prompt_tokens = ev.cached_prompt_tokens;
            if ev.finish_reason.is_some() {
                o.finish = ev.finish_reason;
            }
            o.events.push(ev);
        }
    }
    out
}

/// Deterministic pseudo-random prompt.
pub fn prompt(seed: u64, len: usize, vocab: u32) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect()
}
