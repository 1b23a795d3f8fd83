//! `switchyard bench profile`: measures the real engine's step times and writes them as a
//! mock-engine profile (`mocker::ProfilePoints` JSON), so `serve --engine mock
//! --mock-profile FILE` and `bench sim --profile FILE` run on measured rather than modelled
//! times.
//!
//! Prefill points: one sequence of `n` new tokens (no cache hit) in one step, for each `n`.
//! Decode points: `b` sequences with `c` tokens of context each, pure decode steps, for
//! each `(b, c)` that fits the KV cache; the point records the batch and the summed context
//! (`b × c`). Each value is the median of several steps.

use std::time::Instant;

use anyhow::{bail, Result};
use engine::backend::Backend;
use engine::core::LlmEngine;
use engine::model::{build_engine, EngineOptions, ModelExecutor};
use mocker::{DecodePoint, PrefillPoint, Profile, ProfilePoints};

use crate::engine_bench::request;

#[derive(Clone, Debug)]
pub struct ProfileBenchOptions {
    pub model: std::path::PathBuf,
    pub prefill_tokens: Vec<usize>,
    pub batch_sizes: Vec<usize>,
    pub contexts: Vec<usize>,
    /// Timed steps per point (the median is kept).
    pub repeats: usize,
    /// Tokens of KV cache to allocate; decode points that need more are skipped.
    pub kv_tokens: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Measures the grid on `backend` and returns the profile (validated by `Profile::new`).
pub fn run_on<B: Backend>(
    opts: &ProfileBenchOptions,
    backend: B,
    progress: &mut dyn FnMut(&str),
) -> Result<ProfilePoints> {
    if opts.repeats == 0 || opts.prefill_tokens.is_empty() || opts.batch_sizes.is_empty() {
        bail!("--repeats, --prefill-tokens and --batch must be non-empty and positive");
    }
    let max_prefill = opts.prefill_tokens.iter().copied().max().unwrap_or(1);
    let eopts = EngineOptions {
        num_blocks: Some(opts.kv_tokens.div_ceil(16) + 64),
        // One step takes a whole prompt: the prefill points are single steps.
        max_batched_tokens: max_prefill.max(opts.batch_sizes.iter().copied().max().unwrap_or(1)),
        max_num_seqs: 1024,
        enable_prefix_caching: false,
        ..EngineOptions::default()
    };
    let mut eng: LlmEngine<ModelExecutor<B>> =
        build_engine(&opts.model, backend, &eopts, &mut |_, _| {})?;
    let vocab = eng.executor().model().config().vocab_size;
    let max_len = eng.config().max_model_len;
    let mut id = 1u64;
    // Warm up (weights paged in, kernels compiled, graphs captured).
    eng.add_request(id, request(0, 64, vocab, 8));
    id += 1;
    while eng.has_work() {
        eng.step();
    }

    let mut prefill = Vec::new();
    for &n in &opts.prefill_tokens {
        if n + 1 >= max_len || n + 1 > opts.kv_tokens {
            progress(&format!("prefill {n}: skipped (does not fit)"));
            continue;
        }
        let mut times = Vec::new();
        for r in 0..opts.repeats {
            eng.add_request(id, request(id as usize + r, n, vocab, 1));
            id += 1;
            let t = Instant::now();
            eng.step();
            times.push(t.elapsed().as_secs_f64());
            while eng.has_work() {
                eng.step();
            }
        }
        let s = median(times);
        progress(&format!("prefill {n:>6} tokens: {:.3} ms", s * 1e3));
        prefill.push(PrefillPoint {
            new_tokens: n as u64,
            seconds: s,
        });
    }

    let mut decode = Vec::new();
    for &b in &opts.batch_sizes {
        for &c in &opts.contexts {
            let need = b * (c + opts.repeats + 2);
            if c + opts.repeats + 2 >= max_len || need > opts.kv_tokens {
                progress(&format!(
                    "decode batch {b} context {c}: skipped (does not fit)"
                ));
                continue;
            }
            for i in 0..b {
                eng.add_request(id, request(id as usize + i, c, vocab, opts.repeats + 2));
                id += 1;
            }
            // Prefill everything (every sequence has its first token), then time decodes.
            // Chunked prefill mixes decodes of the early sequences into these steps, so
            // count sequences, not events.
            let mut started = std::collections::HashSet::new();
            while started.len() < b {
                started.extend(eng.step().into_iter().map(|(id, _)| id));
            }
            let mut times = Vec::new();
            for _ in 0..opts.repeats {
                let t = Instant::now();
                eng.step();
                times.push(t.elapsed().as_secs_f64());
            }
            while eng.has_work() {
                eng.step();
            }
            let s = median(times);
            progress(&format!(
                "decode batch {b:>4} context {c:>6}: {:.3} ms",
                s * 1e3
            ));
            decode.push(DecodePoint {
                batch_size: b as u64,
                kv_tokens: (b * c) as u64,
                seconds: s,
            });
        }
    }
    let points = ProfilePoints { prefill, decode };
    // Fails here, not in the mock, if the grid left a table empty.
    Profile::new(points.clone())?;
    Ok(points)
}
