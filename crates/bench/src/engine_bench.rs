//! Engine throughput: prefill tokens/s, and decode tokens/s at several batch sizes, measured
//! by driving the synchronous engine directly, next to the batch-1 bound that reading every
//! weight once per step at the machine's measured memory bandwidth allows.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use engine::backend::cpu::{kernels, CpuBackend};
use engine::backend::Backend;
use engine::core::{Executor, GenerateRequest, LlmEngine};
use engine::model::{build_engine, build_tp_engine, EngineOptions, ModelConfig, ModelExecutor};
use serde::Serialize;

#[derive(Clone, Debug)]
pub struct EngineBenchOptions {
    pub model: PathBuf,
    pub batch_sizes: Vec<usize>,
    pub prompt_len: usize,
    pub decode_tokens: usize,
    pub prefill_prompts: usize,
    pub prefill_len: usize,
    pub threads: Option<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DecodeRow {
    pub batch: usize,
    pub tokens_per_s: f64,
    /// Mean step time (what `tokens_per_s` comes from).
    pub step_ms: f64,
    /// Step-time quantiles, each step timed on its own. On a shared or noisy machine the
    /// median says what the engine does when it gets the cores; the mean also counts the
    /// steps that waited for them.
    pub step_ms_p10: f64,
    pub step_ms_p50: f64,
    pub step_ms_p90: f64,
    /// `batch / p50`: the rate at the median step.
    pub tokens_per_s_at_p50: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct EngineBenchReport {
    pub model: String,
    pub threads: usize,
    /// The CPU kernels' instruction set (`SWITCHYARD_CPU_ISA` names).
    pub isa: String,
    /// Tensor-parallel ranks the model is sharded over.
    pub tensor_parallel: usize,
    pub weight_bytes: usize,
    pub bytes_per_decode_step: usize,
    pub memory_bandwidth_gbs: f64,
    pub batch1_bound_tokens_per_s: f64,
    pub prefill_tokens_per_s: f64,
    pub prefill_len: usize,
    pub decode: Vec<DecodeRow>,
}

/// How the benchmark sizes its engine: room for every sequence at once (this measures
/// compute, not preemption) and no prefix caching.
fn engine_options(kv_tokens: usize) -> EngineOptions {
    EngineOptions {
        num_blocks: Some(kv_tokens.div_ceil(16) + 64),
        max_batched_tokens: 2048,
        max_num_seqs: 1024,
        enable_prefix_caching: false,
        ..EngineOptions::default()
    }
}

/// A greedy request for `len` deterministic prompt tokens that ignores EOS.
pub(crate) fn request(seed: usize, len: usize, vocab: usize, max_tokens: usize) -> GenerateRequest {
    let prompt = (0..len)
        .map(|i| ((seed * 7919 + i * 104_729 + 13) % vocab) as u32)
        .collect();
    let mut r = GenerateRequest::greedy(prompt, max_tokens as u32);
    r.ignore_eos = true;
    r
}

/// Runs the benchmark on the CPU backend, next to the host's measured read bandwidth.
pub fn run(opts: &EngineBenchOptions) -> Result<EngineBenchReport> {
    if let Some(n) = opts.threads {
        kernels::set_num_threads(n);
    }
    let bw = kernels::measure_read_bandwidth_gbs();
    run_on(opts, CpuBackend::new(), bw)
}

/// Runs the benchmark on `backend`; `memory_bandwidth_gbs` (that device's measured figure)
/// sets the batch-1 bound.
pub fn run_on<B: Backend>(
    opts: &EngineBenchOptions,
    backend: B,
    memory_bandwidth_gbs: f64,
) -> Result<EngineBenchReport> {
    let mut eng = build_engine(
        &opts.model,
        backend,
        &engine_options(kv_tokens(opts)),
        &mut |_, _| {},
    )?;
    let model = eng.executor().model();
    let (cfg, weight_bytes) = (model.config().clone(), model.weight_bytes());
    run_with(opts, &mut eng, cfg, weight_bytes, 1, memory_bandwidth_gbs)
}

/// Runs the benchmark on one engine sharded over `backends` (tensor parallelism, one rank
/// each, their all-reduce already joined). `memory_bandwidth_gbs` is all ranks' together.
pub fn run_tp_on<B: Backend>(
    opts: &EngineBenchOptions,
    backends: Vec<B>,
    memory_bandwidth_gbs: f64,
) -> Result<EngineBenchReport>
where
    ModelExecutor<B>: Send,
{
    let ranks = backends.len();
    let eopts = engine_options(kv_tokens(opts));
    let mut eng = build_tp_engine(&opts.model, backends, &eopts, &mut |_, _| {})?;
    let model = eng.executor().shard(0).model();
    let (cfg, weight_bytes) = (model.config().clone(), model.weight_bytes());
    run_with(
        opts,
        &mut eng,
        cfg,
        weight_bytes,
        ranks,
        memory_bandwidth_gbs,
    )
}

/// Tokens of KV cache the runs need at once.
fn kv_tokens(opts: &EngineBenchOptions) -> usize {
    let max_batch = opts.batch_sizes.iter().copied().max().unwrap_or(1);
    (max_batch * (opts.prompt_len + opts.decode_tokens + 1))
        .max(opts.prefill_prompts * (opts.prefill_len + 2))
}

fn run_with<E: Executor>(
    opts: &EngineBenchOptions,
    eng: &mut LlmEngine<E>,
    cfg: ModelConfig,
    weight_bytes: usize,
    ranks: usize,
    memory_bandwidth_gbs: f64,
) -> Result<EngineBenchReport> {
    let vocab = cfg.vocab_size;
    // A decode step reads every weight but the embedding table (one row of it at most);
    // a tied table is read once as the output layer.
    let embed_bytes = cfg.vocab_size * cfg.hidden_size * elem_bytes(weight_bytes, &cfg);
    let bytes_per_step = if cfg.tie_word_embeddings {
        weight_bytes
    } else {
        weight_bytes - embed_bytes
    };
    let bw = memory_bandwidth_gbs;
    let bound = bw * 1e9 / bytes_per_step as f64;

    // Warm up: page in the weights, touch the KV cache.
    let mut id = 1;
    eng.add_request(id, request(0, 64, vocab, 4));
    id += 1;
    while eng.has_work() {
        eng.step();
    }

    // Prefill: distinct prompts, one output token each.
    for i in 0..opts.prefill_prompts {
        eng.add_request(id, request(i + 1000, opts.prefill_len, vocab, 1));
        id += 1;
    }
    let t = Instant::now();
    while eng.has_work() {
        eng.step();
    }
    let prefill_tps = (opts.prefill_prompts * opts.prefill_len) as f64 / t.elapsed().as_secs_f64();

    let mut decode = Vec::new();
    for &b in &opts.batch_sizes {
        for i in 0..b {
            eng.add_request(
                id,
                request(i + 10 * b, opts.prompt_len, vocab, opts.decode_tokens + 1),
            );
            id += 1;
        }
        // Prefill every sequence first; time only steps that are pure decode. Chunked
        // prefill mixes decodes of the early sequences into these steps, so count
        // sequences, not events.
        let mut started = std::collections::HashSet::new();
        while started.len() < b {
            started.extend(eng.step().into_iter().map(|(id, _)| id));
        }
        let mut tokens = 0usize;
        let mut step_ms = Vec::new();
        let t = Instant::now();
        while eng.has_work() {
            let s = Instant::now();
            tokens += eng.step().iter().filter(|(_, e)| e.token.is_some()).count();
            step_ms.push(s.elapsed().as_secs_f64() * 1e3);
        }
        let secs = t.elapsed().as_secs_f64();
        step_ms.sort_by(f64::total_cmp);
        let q = |q: f64| match step_ms.len() {
            0 => 0.0,
            n => step_ms[((n - 1) as f64 * q).round() as usize],
        };
        decode.push(DecodeRow {
            batch: b,
            tokens_per_s: tokens as f64 / secs,
            step_ms: secs * 1e3 / step_ms.len().max(1) as f64,
            step_ms_p10: q(0.1),
            step_ms_p50: q(0.5),
            step_ms_p90: q(0.9),
            tokens_per_s_at_p50: if q(0.5) > 0.0 {
                b as f64 * 1e3 / q(0.5)
            } else {
                0.0
            },
        });
    }

    Ok(EngineBenchReport {
        model: opts.model.display().to_string(),
        threads: kernels::num_threads(),
        isa: kernels::isa_name().to_string(),
        tensor_parallel: ranks,
        weight_bytes,
        bytes_per_decode_step: bytes_per_step,
        memory_bandwidth_gbs: bw,
        batch1_bound_tokens_per_s: bound,
        prefill_tokens_per_s: prefill_tps,
        prefill_len: opts.prefill_len,
        decode,
    })
}

/// Bytes per weight element, inferred from the checkpoint size and the parameter count.
fn elem_bytes(weight_bytes: usize, cfg: &engine::model::ModelConfig) -> usize {
    let params = param_count(cfg);
    (weight_bytes as f64 / params as f64).round().max(1.0) as usize
}

fn param_count(c: &engine::model::ModelConfig) -> usize {
    let (h, q, kv, i, v) = (
        c.hidden_size,
        c.q_size(),
        c.kv_size(),
        c.intermediate_size,
        c.vocab_size,
    );
    let mut per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h;
    if c.qkv_bias {
        per_layer += q + 2 * kv;
    }
    if c.qk_norm {
        per_layer += 2 * c.head_dim;
    }
    let head = if c.tie_word_embeddings { 0 } else { v * h };
    c.num_layers * per_layer + v * h + head + h
}

pub fn print_table(r: &EngineBenchReport) {
    println!(
        "model: {}  threads: {}  isa: {}  tensor parallel: {}",
        r.model, r.threads, r.isa, r.tensor_parallel
    );
    println!(
        "weights: {:.1} MB, read per decode step: {:.1} MB, memory bandwidth: {:.1} GB/s",
        r.weight_bytes as f64 / 1e6,
        r.bytes_per_decode_step as f64 / 1e6,
        r.memory_bandwidth_gbs
    );
    println!();
    println!(
        "| measure | tokens/s | step ms (mean) | step ms p10 / p50 / p90 | tokens/s at p50 step | bound tokens/s |"
    );
    println!("|---|---:|---:|---|---:|---:|");
    println!(
        "| prefill ({}-token prompts) | {:.0} | | | | |",
        r.prefill_len, r.prefill_tokens_per_s
    );
    for d in &r.decode {
        let bound = if d.batch == 1 {
            format!("{:.0}", r.batch1_bound_tokens_per_s)
        } else {
            String::new()
        };
        println!(
            "| decode batch {} | {:.0} | {:.2} | {:.2} / {:.2} / {:.2} | {:.0} | {} |",
            d.batch,
            d.tokens_per_s,
            d.step_ms,
            d.step_ms_p10,
            d.step_ms_p50,
            d.step_ms_p90,
            d.tokens_per_s_at_p50,
            bound
        );
    }
}
