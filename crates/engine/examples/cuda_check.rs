//! Checks the CUDA backend against the CPU backend and times it, on the GPU machine.
//! `scripts/gpu/check_and_bench.sh` runs it; it prints a short table last.
//!
//! ```text
//! cuda_check check             # synth tiny/small models, compare CUDA with CPU
//! cuda_check bench MODEL_DIR   # batch-1 decode, W1 (256 × 512 / 128), prefill 8 × 2048
//! cuda_check bench MODEL_DIR w1 w1s w1s-host   # W1 greedy, sampled on the device, on the host
//! ```
//!
//! Checks: logits of mixed prefill/decode steps and of a step that reads a cached prefix
//! (relative error ‖cuda − cpu‖ / ‖cpu‖ ≤ 2e-2), greedy agreement over 64 tokens, batch
//! invariance (one sequence alone or among others gives the same tokens) and prefix-cache
//! hit equivalence (the same prompt twice gives the same tokens), CUDA graphs vs eager steps,
//! and the skinny-GEMM kernel (matmuls of ≤ 8 rows) against cuBLAS and an f64 reference on
//! the 8b model's shapes, with both timed (`CUDA_CHECK_SKIP_GEMV=1` skips it), and device
//! sampling: the kernel against the host reference and its draw frequencies on a synthetic
//! row, top_k = 1 against greedy, seeded requests reproducible.

mod common;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use common::rel_err;
use engine::backend::cpu::CpuBackend;
use engine::backend::cuda::{CudaBackend, CudaOptions};
use engine::backend::{sample_row_weights, Backend, ForwardBatch, RowSampling, SeqSlice};
use engine::core::{Executor, GenerateRequest, LlmEngine, SamplingParams};
use engine::model::{build_engine, EngineOptions, Model, ModelExecutor};

fn cuda() -> CudaBackend {
    match CudaBackend::new(CudaOptions::default()) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

fn synth(dir: &Path, arch: synth::Arch, size: synth::Size, dtype: synth::DType) -> PathBuf {
    let out = dir.join(format!("{arch:?}-{size:?}-{dtype:?}").to_lowercase());
    synth::synthesize(&synth::SynthOptions {
        out: out.clone(),
        arch,
        size,
        dtype,
        seed: 7,
        progress: false,
    })
    .expect("synth");
    out
}

fn executor<B: Backend>(dir: &Path, b: B) -> ModelExecutor<B> {
    let model = Model::load(dir, &b, &mut |_, _| {}).expect("load");
    ModelExecutor::new(b, model, 64, 16).expect("cache")
}

/// One sequence of a hand-built step: tokens already cached, new tokens, its blocks.
struct S {
    cached: usize,
    new: Vec<u32>,
    blocks: Vec<u32>,
}

fn batch(seqs: &[S]) -> ForwardBatch {
    let bs = 16;
    let mut b = ForwardBatch {
        block_size: bs,
        ..ForwardBatch::default()
    };
    for s in seqs {
        let q_start = b.token_ids.len();
        for (i, &t) in s.new.iter().enumerate() {
            let pos = s.cached + i;
            b.token_ids.push(t);
            b.positions.push(pos as u32);
            b.slots
                .push(s.blocks[pos / bs] * bs as u32 + (pos % bs) as u32);
        }
        b.seqs.push(SeqSlice {
            q_start,
            q_len: s.new.len(),
            ctx_len: s.cached + s.new.len(),
            block_table: s.blocks.clone(),
        });
        b.logit_rows.push((q_start + s.new.len() - 1) as u32);
    }
    b
}

fn toks(seed: u32, n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((seed as usize * 7919 + i * 104_729 + 13) % vocab) as u32)
        .collect()
}

/// Steps: a varlen prefill (5, 37, 70 tokens: tiles cross 64), a decode step of all three,
/// then a fourth sequence sharing the first's two cached blocks (prefix hit) with 9 new
/// tokens alongside a decode of the second. Returns the worst relative error.
fn logits_check(dir: &Path) -> f64 {
    let mut cpu = executor(dir, CpuBackend::new());
    let mut gpu = executor(dir, cuda());
    let v = cpu.vocab_size();
    let (a, b, c) = (toks(1, 37, v), toks(2, 70, v), toks(3, 5, v));
    let steps = [
        batch(&[
            S {
                cached: 0,
                new: c.clone(),
                blocks: vec![10],
            },
            S {
                cached: 0,
                new: a.clone(),
                blocks: vec![0, 1, 2],
            },
            S {
                cached: 0,
                new: b.clone(),
                blocks: vec![3, 4, 5, 6, 7],
            },
        ]),
        batch(&[
            S {
                cached: 5,
                new: vec![11],
                blocks: vec![10],
            },
            S {
                cached: 37,
                new: vec![12],
                blocks: vec![0, 1, 2],
            },
            S {
                cached: 70,
                new: vec![13],
                blocks: vec![3, 4, 5, 6, 7],
            },
        ]),
        batch(&[
            S {
                cached: 32,
                new: toks(4, 9, v),
                blocks: vec![0, 1, 20],
            },
            S {
                cached: 71,
                new: vec![14],
                blocks: vec![3, 4, 5, 6, 7],
            },
        ]),
    ];
    let mut worst: f64 = 0.0;
    for (i, st) in steps.iter().enumerate() {
        let r = cpu.execute(st);
        let g = gpu.execute(st);
        let e = rel_err(&g, &r);
        println!(
            "  step {i}: {} logit rows, rel err {e:.2e}",
            st.logit_rows.len()
        );
        worst = worst.max(e);
    }
    worst
}

fn engine_of<B: Backend>(dir: &Path, b: B, prefix: bool) -> LlmEngine<ModelExecutor<B>> {
    let opts = EngineOptions {
        num_blocks: Some(512),
        enable_prefix_caching: prefix,
        ..EngineOptions::default()
    };
    build_engine(dir, b, &opts, &mut |_, _| {}).expect("engine")
}

/// Runs requests to completion and returns each one's output tokens, in request order.
fn run<E: Executor>(eng: &mut LlmEngine<E>, reqs: Vec<GenerateRequest>) -> Vec<Vec<u32>> {
    let n = reqs.len();
    for (i, r) in reqs.into_iter().enumerate() {
        eng.add_request(i as u64 + 1, r);
    }
    let mut out = vec![Vec::new(); n];
    while eng.has_work() {
        for (id, ev) in eng.step() {
            if let Some(t) = ev.token {
                out[id as usize - 1].push(t);
            }
        }
    }
    out
}

fn greedy(prompt: Vec<u32>, n: u32) -> GenerateRequest {
    let mut r = GenerateRequest::greedy(prompt, n);
    r.ignore_eos = true;
    r
}

fn sampled(prompt: Vec<u32>, n: u32, temperature: f32, top_p: f32, seed: u64) -> GenerateRequest {
    GenerateRequest {
        prompt,
        sampling: SamplingParams {
            temperature,
            top_p,
            seed: Some(seed),
            ..SamplingParams::default()
        },
        max_tokens: n,
        stop_token_ids: Vec::new(),
        ignore_eos: true,
    }
}

/// Uniforms in [0, 1) from a fixed xorshift stream.
fn uniforms(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32) / (1u64 << 24) as f32
        })
        .collect()
}

/// Device sampling: the kernel against the host reference (same filters, same uniform) on
/// synthetic 128256-token rows, top_k = 1 against greedy, the frequencies of 10k draws
/// against the nucleus probabilities, and through the engine: top_k = 1 rows among sampled
/// ones give the greedy tokens, and the same seeds give the same tokens twice.
fn sampling_check(small: &Path, table: &mut Vec<String>) -> bool {
    let b = cuda();
    let mut ok = true;
    let vocab = 128_256;
    // A peaked row: 24 head tokens 0.35 apart (ids spread out), a tail far below, ties,
    // a NaN and a -inf. The tail is light (≈ 0.3% of the mass at T = 1): with 10k draws a
    // nucleus or tail of thousands of rare tokens would make the total-variation distance
    // sampling noise (a tail in [-9, -4] gave TV 0.15 / 0.24 at top_p 0.9 / full, for the
    // exact host draws with the same uniforms as for the device).
    let mut row: Vec<f32> = uniforms(3, vocab).iter().map(|u| -16.0 + 5.0 * u).collect();
    for i in 0..24 {
        row[(i * 5_347 + 11) % vocab] = 6.0 - 0.35 * i as f32;
    }
    row[77] = 6.0 - 0.35 * 3.0; // a tie with head token 3
    row[5] = f32::NAN;
    row[6] = f32::NEG_INFINITY;
    // The device rounds to bf16: so does the reference.
    let row: Vec<f32> = row
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect();
    let cases = [
        ("T=1 top_p=0.9", 1.0, 0, 0.9, 0.0),
        ("T=0.7 top_k=5", 0.7, 5, 1.0, 0.0),
        ("T=1.3 top_k=50 top_p=0.8 min_p=0.05", 1.3, 50, 0.8, 0.05),
        ("T=1 (full)", 1.0, 0, 1.0, 0.0),
        ("T=2 min_p=0.2", 2.0, 0, 1.0, 0.2),
    ];
    let n = 10_000;
    for (ci, &(name, t, k, p, mp)) in cases.iter().enumerate() {
        let us = uniforms(100 + ci as u64, n);
        let rows: Vec<RowSampling> = us
            .iter()
            .map(|&u| RowSampling {
                temperature: t,
                top_k: k,
                top_p: p,
                min_p: mp,
                uniform: u,
            })
            .collect();
        let t0 = Instant::now();
        let ids = match b.sample_host_logits(&row, vocab, &rows) {
            Ok(ids) => ids,
            Err(e) => {
                println!("sampling {name}: {e}");
                return false;
            }
        };
        let secs = t0.elapsed().as_secs_f64();
        // The host reference: the kept weights, then the same inverse CDF per uniform.
        let w = sample_row_weights(&row, &rows[0]);
        let mut cum = Vec::with_capacity(vocab);
        let mut acc = 0.0f64;
        for &x in &w {
            acc += x as f64;
            cum.push(acc);
        }
        let total = acc;
        let last_kept = w.iter().rposition(|&x| x > 0.0).unwrap_or(0);
        let mut counts = vec![0u32; vocab];
        let mut host_counts = vec![0u32; vocab];
        let mut same = 0;
        for (&id, &u) in ids.iter().zip(&us) {
            counts[id as usize] += 1;
            let target = u as f64 * total;
            let want = cum.partition_point(|&c| c <= target).min(last_kept);
            host_counts[want] += 1;
            same += (id as usize == want) as usize;
        }
        let tv_of = |counts: &[u32]| -> f64 {
            0.5 * w
                .iter()
                .zip(counts)
                .map(|(&wi, &ci)| (wi as f64 / total - ci as f64 / n as f64).abs())
                .sum::<f64>()
        };
        // The exact draws' own distance (sampling noise of 10k draws), for scale.
        let (tv, tv_host) = (tv_of(&counts), tv_of(&host_counts));
        let kept = w.iter().filter(|&&x| x > 0.0).count();
        let outside = w
            .iter()
            .zip(&counts)
            .filter(|(&wi, &ci)| wi == 0.0 && ci > 0)
            .count();
        let pass = tv < 0.03 && outside == 0 && same as f64 >= 0.995 * n as f64;
        ok &= pass;
        println!("sampling {name}: tv {tv:.4} (host {tv_host:.4}), kept {kept}, outside {outside}, same as host {same}/{n}, {n} rows in {:.1} ms", secs * 1e3);
        table.push(format!(
            "| device sampling {name}, 10k draws on a 128256-token row ({kept} kept) | TV {tv:.4} (exact host draws {tv_host:.4}); {same}/{n} equal to the host reference; {outside} outside the kept set | TV < 0.03, ≥ 99.5% equal, 0 outside | {} |",
            verdict(pass)
        ));
    }
    // top_k = 1 (any temperature) is the argmax, first maximum on ties.
    let rows: Vec<RowSampling> = (0..64)
        .map(|i| RowSampling {
            temperature: 1.0,
            top_k: 1,
            top_p: 0.9,
            min_p: 0.0,
            uniform: i as f32 / 64.0,
        })
        .collect();
    let many: Vec<f32> = (0..64)
        .flat_map(|i| {
            uniforms(900 + i, vocab)
                .into_iter()
                .map(|u| half::bf16::from_f32(u * 8.0).to_f32())
        })
        .collect();
    let ids = b
        .sample_host_logits(&many, vocab, &rows)
        .unwrap_or_default();
    let argmax_ok = ids.len() == 64
        && ids.iter().enumerate().all(|(i, &id)| {
            let r = &many[i * vocab..(i + 1) * vocab];
            let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            r.iter().position(|&x| x == m) == Some(id as usize)
        });
    ok &= argmax_ok;
    table.push(format!(
        "| device sampling top_k=1 = argmax (64 rows, first max) | {} | all | {} |",
        if argmax_ok { "all equal" } else { "differ" },
        verdict(argmax_ok)
    ));
    drop(b);

    // Through the engine on the small model.
    let mut gpu = engine_of(small, cuda(), false);
    let v = gpu.executor().vocab_size();
    let target = toks(700, 29, v);
    let alone = run(&mut gpu, vec![greedy(target.clone(), 32)]);
    let mut k1 = sampled(target.clone(), 32, 1.0, 0.95, 1);
    k1.sampling.top_k = 1;
    let mixed = run(
        &mut gpu,
        vec![k1, sampled(toks(701, 17, v), 32, 0.8, 0.95, 2)],
    );
    let pass = alone[0] == mixed[0];
    ok &= pass;
    table.push(format!(
        "| engine: top_k=1 row among sampled rows (device path) = greedy alone | {} / 32 | 32 | {} |",
        agree(&alone[0], &mixed[0]),
        verdict(pass)
    ));
    let reqs = || {
        (0..6)
            .map(|i| {
                sampled(
                    toks(800 + i, 11 + 7 * i as usize, v),
                    40,
                    0.8,
                    0.95,
                    42 + i as u64,
                )
            })
            .collect::<Vec<_>>()
    };
    let first = run(&mut gpu, reqs());
    let second = run(&mut gpu, reqs());
    let distinct = first
        .iter()
        .flatten()
        .collect::<std::collections::HashSet<_>>()
        .len();
    let pass = first == second && distinct > 1;
    ok &= pass;
    table.push(format!(
        "| engine: same seeds twice, 6 seqs × 40 tokens, T=0.8 top_p=0.95 | {} ({distinct} distinct tokens) | identical | {} |",
        if first == second { "identical" } else { "differ" },
        verdict(pass)
    ));
    ok
}

fn agree(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn check() -> bool {
    let tmp = std::env::temp_dir().join(format!("switchyard-cuda-check-{}", std::process::id()));
    let mut ok = true;
    let mut table = Vec::new();
    use synth::{Arch, DType, Size};
    let models = [
        (Arch::Llama, Size::Tiny, DType::F32),
        (Arch::Qwen2, Size::Tiny, DType::Bf16),
        (Arch::Qwen3, Size::Tiny, DType::Bf16),
        (Arch::Mistral, Size::Tiny, DType::F16),
        (Arch::Llama, Size::Small, DType::Bf16),
    ];
    for (arch, size, dtype) in models {
        let dir = synth(&tmp, arch, size, dtype);
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        println!("{name}: logits");
        let e = logits_check(&dir);
        let pass = e <= 2e-2;
        ok &= pass;
        table.push(format!(
            "| logits {name} | rel err {e:.2e} | ≤ 2e-2 | {} |",
            verdict(pass)
        ));
    }

    // Greedy agreement over 64 tokens on the tiny model (f32 weights become bf16 on the
    // GPU, so the two may part ways after a while: report where).
    let tiny = synth(&tmp, Arch::Llama, Size::Tiny, DType::F32);
    let small = synth(&tmp, Arch::Llama, Size::Small, DType::Bf16);
    for (name, dir) in [("tiny f32", &tiny), ("small bf16", &small)] {
        let mut cpu = engine_of(dir, CpuBackend::new(), false);
        let mut gpu = engine_of(dir, cuda(), false);
        let v = gpu.executor().vocab_size();
        let prompts: Vec<Vec<u32>> = (0..4)
            .map(|i| toks(50 + i, 12 + 7 * i as usize, v))
            .collect();
        let c = run(
            &mut cpu,
            prompts.iter().map(|p| greedy(p.clone(), 64)).collect(),
        );
        let g = run(
            &mut gpu,
            prompts.iter().map(|p| greedy(p.clone(), 64)).collect(),
        );
        let agreed: Vec<usize> = c.iter().zip(&g).map(|(a, b)| agree(a, b)).collect();
        println!("greedy agreement {name}: {agreed:?} of 64");
        table.push(format!(
            "| greedy agreement {name} (4 prompts) | {agreed:?} / 64 | report | info |"
        ));
    }

    // Batch invariance: a sequence alone and among 7 others of other lengths.
    {
        let mut gpu = engine_of(&small, cuda(), false);
        let v = gpu.executor().vocab_size();
        let target = toks(99, 45, v);
        let alone = run(&mut gpu, vec![greedy(target.clone(), 32)]);
        let mut reqs = vec![greedy(target.clone(), 32)];
        reqs.extend((0..7).map(|i| greedy(toks(200 + i, 10 + 13 * i as usize, v), 32)));
        let together = run(&mut gpu, reqs);
        let n = agree(&alone[0], &together[0]);
        println!("batch invariance: {n} of 32 tokens equal");
        let pass = n == 32;
        ok &= pass;
        table.push(format!(
            "| batch invariance (small) | {n} / 32 | 32 | {} |",
            verdict(pass)
        ));
    }

    // Prefix-cache hit: the second run of a prompt reuses cached blocks.
    {
        let mut gpu = engine_of(&small, cuda(), true);
        let v = gpu.executor().vocab_size();
        let p = toks(300, 100, v);
        let first = run(&mut gpu, vec![greedy(p.clone(), 32)]);
        let hits0 = gpu.stats().prefix_hit_tokens;
        let second = run(&mut gpu, vec![greedy(p.clone(), 32)]);
        let hits = gpu.stats().prefix_hit_tokens - hits0;
        let n = agree(&first[0], &second[0]);
        println!("prefix cache: {hits} prompt tokens hit, {n} of 32 tokens equal");
        let pass = n == 32 && hits > 0;
        ok &= pass;
        table.push(format!(
            "| prefix-cache hit ({hits} tokens hit) | {n} / 32 | 32 | {} |",
            verdict(pass)
        ));
    }
    // CUDA graphs: decode steps replayed from recorded graphs give exactly the greedy tokens
    // of eager steps, alone (bucket 1) and in a batch that shrinks as requests finish (so
    // padded buckets), with prefill steps (eager) in between.
    for (name, dir) in [("tiny f32", &tiny), ("small bf16", &small)] {
        let mut eager = engine_of(dir, cuda(), false);
        eager.executor().backend().set_cuda_graphs(false);
        let mut graphed = engine_of(dir, cuda(), false);
        graphed.executor().backend().set_cuda_graphs(true);
        let v = graphed.executor().vocab_size();
        let one = || vec![greedy(toks(400, 37, v), 48)];
        let mixed = || {
            (0..6)
                .map(|i| greedy(toks(500 + i, 9 + 11 * i as usize, v), 12 + 9 * i))
                .collect::<Vec<_>>()
        };
        for (what, reqs) in [("batch 1", one()), ("mixed batch of 6", mixed())] {
            let want: Vec<usize> = reqs.iter().map(|r| r.max_tokens as usize).collect();
            let e = run(&mut eager, reqs.clone());
            let g = run(&mut graphed, reqs);
            let same: Vec<usize> = e.iter().zip(&g).map(|(a, b)| agree(a, b)).collect();
            let buckets = graphed.executor().backend().cuda_graph_buckets();
            println!("graphs vs eager, {name}, {what}: {same:?} of {want:?} (graphs {buckets:?})");
            let pass = same == want && e == g && !buckets.is_empty();
            ok &= pass;
            table.push(format!(
                "| graphs vs eager, {name}, {what} (graphs {buckets:?}) | {same:?} | {want:?} | {} |",
                verdict(pass)
            ));
        }
    }

    ok &= sampling_check(&small, &mut table);
    let _ = std::fs::remove_dir_all(&tmp);
    if std::env::var("CUDA_CHECK_SKIP_GEMV").is_ok_and(|v| v == "1") {
        println!("\n| check | measured | target | result |\n|---|---|---|---|");
        for l in table {
            println!("{l}");
        }
        return ok;
    }
    let gemv_ok = gemv_check(&mut table);
    ok &= gemv_ok;
    println!("\n| check | measured | target | result |\n|---|---|---|---|");
    for l in table {
        println!("{l}");
    }
    ok
}

/// The skinny-GEMM kernel (M ≤ 8) against cuBLAS and an f64 host reference, on fresh random
/// bf16 inputs in the 8b model's shapes (qkv, o, gate_up, down, lm_head) and an odd one
/// (columns not a multiple of the block, k not a multiple of 256), with both timed.
fn gemv_check(table: &mut Vec<String>) -> bool {
    let b = cuda();
    let mut ok = true;
    let shapes: &[(&str, usize, usize, &[usize])] = &[
        ("odd", 1001, 200, &[1, 3, 8]),
        ("qkv", 6144, 4096, &[1, 2, 4, 8]),
        ("o", 4096, 4096, &[1, 8]),
        ("gate_up", 28672, 4096, &[1, 2, 4, 8]),
        ("down", 4096, 14336, &[1, 8]),
        ("lm_head", 128256, 4096, &[1, 8]),
    ];
    let mut times = Vec::new();
    let mut seed = 1;
    for &(name, n, k, ms) in shapes {
        for &m in ms {
            seed += 1;
            let r = match b.gemv_check(m, n, k, seed) {
                Ok(r) => r,
                Err(e) => {
                    println!("gemv {name} m={m}: {e}");
                    ok = false;
                    continue;
                }
            };
            let pass = r.all_written && r.rel_err_gemv <= 1e-2;
            ok &= pass;
            println!("gemv {name} {m}x{n}x{k}: {r:?}");
            table.push(format!(
                "| gemv {name} M={m} N={n} K={k} | rel err {:.2e} (cuBLAS {:.2e}; vs cuBLAS {:.2e}) | ≤ 1e-2, all written | {} |",
                r.rel_err_gemv,
                r.rel_err_cublas,
                r.rel_diff_gemv_cublas,
                verdict(pass)
            ));
            let gbs = |us: f64| r.weight_bytes as f64 / us / 1e3;
            times.push(format!(
                "| gemv {name} M={m} N={n} K={k} | {:.1} µs, {:.0} GB/s | {:.1} µs, {:.0} GB/s | {:.2}× | {:.1} µs at 3019 GB/s |",
                r.gemv_us,
                gbs(r.gemv_us),
                r.cublas_us,
                gbs(r.cublas_us),
                r.cublas_us / r.gemv_us,
                r.weight_bytes as f64 / 3019e3
            ));
        }
    }
    println!("\n| matmul (weights streamed once) | gemv kernel | cuBLAS | speed-up | limit |\n|---|---|---|---|---|");
    for t in times {
        println!("{t}");
    }
    ok
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "pass"
    } else {
        "FAIL"
    }
}

fn bench(dir: &Path, what: &[String]) {
    let backend = cuda();
    println!(
        "device: {}; CUDA graphs {}; gemv for M ≤ 8 {}",
        backend.describe(),
        if backend.cuda_graphs() { "on" } else { "off" },
        if std::env::var("SWITCHYARD_CUDA_GEMV").is_ok_and(|v| v == "0") {
            "off (cuBLAS)"
        } else {
            "on"
        }
    );
    let opts = EngineOptions {
        max_batched_tokens: 8192,
        max_num_seqs: 256,
        enable_prefix_caching: false,
        ..EngineOptions::default()
    };
    let t = Instant::now();
    let mut eng = build_engine(dir, backend, &opts, &mut |_, _| {}).expect("engine");
    let cfg = eng.executor().model().config().clone();
    let weight_bytes = eng.executor().model().weight_bytes();
    println!(
        "loaded {:.2} GB in {:.1} s; KV cache {} blocks of 16",
        weight_bytes as f64 / 1e9,
        t.elapsed().as_secs_f64(),
        eng.stats().blocks_total
    );
    let v = cfg.vocab_size;
    let mut id = 1u64;
    let mut add = |eng: &mut LlmEngine<_>, p: Vec<u32>, n: u32| {
        eng.add_request(id, greedy(p, n));
        id += 1;
    };
    // Warm-up: kernels, cuBLAS heuristics, memory pool.
    for i in 0..4 {
        add(&mut eng, toks(i, 600, v), 8);
    }
    while eng.has_work() {
        eng.step();
    }
    let mut rows = Vec::new();
    // Batch-1 decode: bytes read per step = every weight but the embedding table.
    let (h, vocab) = (cfg.hidden_size, cfg.vocab_size);
    let embed = 2 * vocab * h;
    let step_bytes = if cfg.tie_word_embeddings {
        weight_bytes
    } else {
        weight_bytes - embed
    };
    let bw = 3.019e12;
    if what.iter().any(|w| w == "decode") {
        add(&mut eng, toks(7, 128, v), 257);
        eng.step(); // prefill
        let mut times = Vec::new();
        while eng.has_work() {
            let t = Instant::now();
            eng.step();
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let med = times[times.len() / 2];
        let roof = bw / step_bytes as f64;
        rows.push(format!(
            "| decode batch 1 (128 in, 256 out) | {:.1} tok/s ({:.2} ms/step, median) | {:.1} tok/s roofline ({:.0}%) |",
            1.0 / med,
            med * 1e3,
            roof,
            100.0 / med / roof
        ));
        println!("{}", rows.last().unwrap());
    }
    if what.iter().any(|w| w == "prefill") {
        for i in 0..8 {
            add(&mut eng, toks(1000 + i, 2048, v), 1);
        }
        let t = Instant::now();
        while eng.has_work() {
            eng.step();
        }
        let secs = t.elapsed().as_secs_f64();
        let tokens = 8.0 * 2048.0;
        let params = (weight_bytes / 2 - vocab * h) as f64;
        let attn = 4.0
            * cfg.num_layers as f64
            * (cfg.num_heads * cfg.head_dim) as f64
            * 8.0
            * 2048.0
            * 2048.0
            / 2.0;
        let flops = 2.0 * params * tokens + attn;
        let mfu = flops / secs / 808e12;
        rows.push(format!(
            "| prefill 8 × 2048 | {:.0} tok/s, {:.0} TFLOP/s | MFU {:.0}% of 808 TFLOP/s (target 60%) |",
            tokens / secs,
            flops / secs / 1e12,
            100.0 * mfu
        ));
        println!("{}", rows.last().unwrap());
    }
    if what.iter().any(|w| w == "w1") {
        for i in 0..256 {
            add(&mut eng, toks(5000 + i, 512, v), 128);
        }
        let t = Instant::now();
        let mut out = 0usize;
        while eng.has_work() {
            out += eng.step().iter().filter(|(_, e)| e.token.is_some()).count();
        }
        let secs = t.elapsed().as_secs_f64();
        rows.push(format!(
            "| W1 256 × 512 in / 128 out | {:.0} output tok/s ({out} tokens, {secs:.2} s) | target 4,500; limit ≈ 6,000 |",
            out as f64 / secs
        ));
        println!("{}", rows.last().unwrap());
    }
    for (what_name, label, device) in [
        (
            "w1s",
            "W1 sampled (T=0.8, top_p=0.95), device sampling",
            true,
        ),
        (
            "w1s-host",
            "W1 sampled (T=0.8, top_p=0.95), host sampling",
            false,
        ),
    ] {
        if !what.iter().any(|w| w == what_name) {
            continue;
        }
        eng.executor().backend().set_device_sampling(device);
        for i in 0..256u32 {
            eng.add_request(
                id,
                sampled(toks(5000 + i, 512, v), 128, 0.8, 0.95, i as u64),
            );
            id += 1;
        }
        let t = Instant::now();
        let mut out = 0usize;
        while eng.has_work() {
            out += eng.step().iter().filter(|(_, e)| e.token.is_some()).count();
        }
        let secs = t.elapsed().as_secs_f64();
        rows.push(format!(
            "| {label} | {:.0} output tok/s ({out} tokens, {secs:.2} s) | greedy W1 above |",
            out as f64 / secs
        ));
        println!("{}", rows.last().unwrap());
    }
    println!("\n| benchmark | measured | limit |\n|---|---|---|");
    for r in rows {
        println!("{r}");
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("check") => {
            if check() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Some("bench") if args.len() >= 2 => {
            let what: Vec<String> = if args.len() > 2 {
                args[2..].to_vec()
            } else {
                vec!["decode".into(), "prefill".into(), "w1".into()]
            };
            bench(Path::new(&args[1]), &what);
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "usage: cuda_check check | cuda_check bench MODEL_DIR [decode] [prefill] [w1] [w1s] [w1s-host]"
            );
            ExitCode::from(2)
        }
    }
}
