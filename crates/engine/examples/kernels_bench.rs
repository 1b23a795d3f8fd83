//! Micro-benchmark of the CPU kernels on the "small" target model's shapes (hidden 512,
//! intermediate 1536, 8 layers, 8×64 query heads, 4 KV heads, vocab 8192).
//!
//! Each measurement runs whole model steps — all 8 layers' qkv, o, gate_up, down and then
//! lm_head, in order, on distinct weights (≈59 MB in bf16, beyond the L3) — so weights come
//! from DRAM as they do in real decoding, not from a cache warmed by repeating one matmul.
//!
//! ```text
//! cargo run --release -p switchyard-engine --example kernels_bench -- [--threads N]
//!     [--m 1,8,32,512] [--dtype bf16,f32] [--ms MILLIS] [--kernels-only] [--json PATH]
//! ```
//!
//! `--kernels-only` skips the bandwidth, FMA-peak and dispatch measurements; `--ms` is the
//! time budget per (dtype, m) row group, of which the fastest call per shape is reported.

use std::time::{Duration, Instant};

use rayon::iter::{IntoParallelIterator, ParallelIterator};

use engine::backend::cpu::kernels::{
    matmul, measure_read_bandwidth_gbs, num_threads, parallel_for, set_num_threads, Matrix,
};

type Json = serde_json::Map<String, serde_json::Value>;

const HIDDEN: usize = 512;
const INTER: usize = 1536;
const LAYERS: usize = 8;
const Q_DIM: usize = 8 * 64;
const KV_DIM: usize = 4 * 64;
const VOCAB: usize = 8192;

/// (name, rows = out features, cols = in features) of one layer's matmuls, then lm_head.
const SHAPES: [(&str, usize, usize); 5] = [
    ("qkv", Q_DIM + 2 * KV_DIM, HIDDEN),
    ("o", HIDDEN, Q_DIM),
    ("gate_up", 2 * INTER, HIDDEN),
    ("down", HIDDEN, INTER),
    ("lm_head", VOCAB, HIDDEN),
];

struct Args {
    threads: Option<usize>,
    ms: Vec<usize>,
    dtypes: Vec<String>,
    skip_setup: bool,
    budget: Duration,
    json: Option<String>,
}

fn parse_args() -> Args {
    let mut args = Args {
        threads: None,
        ms: vec![1, 8, 32, 512],
        dtypes: vec!["bf16".into(), "f32".into()],
        skip_setup: false,
        budget: Duration::from_millis(1500),
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--threads" => args.threads = Some(value().parse().expect("--threads N")),
            "--ms" => args.budget = Duration::from_millis(value().parse().expect("--ms N")),
            "--json" => args.json = Some(value()),
            "--m" => {
                args.ms = value()
                    .split(',')
                    .map(|v| v.parse().expect("--m 1,8,32"))
                    .collect()
            }
            "--dtype" => args.dtypes = value().split(',').map(String::from).collect(),
            "--kernels-only" => args.skip_setup = true,
            other => panic!(
                "unknown argument {other:?} (--threads, --m, --dtype, --ms, --kernels-only, --json)"
            ),
        }
    }
    args
}

/// Pseudo-random values in [-1, 1); the kernels' speed does not depend on them.
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn make_matrix(dtype: &str, rows: usize, cols: usize, seed: u64) -> Matrix {
    let v = values(rows * cols, seed);
    match dtype {
        "bf16" => Matrix::from_bf16_bits(
            rows,
            cols,
            v.iter().map(|x| (x.to_bits() >> 16) as u16).collect(),
        ),
        _ => Matrix::from_f32(rows, cols, v),
    }
}

/// One model's worth of weights: `LAYERS` copies of the four layer shapes, then lm_head.
fn make_model(dtype: &str) -> Vec<Vec<Matrix>> {
    let mut seed = 1;
    let mut layer = |shapes: &[(&str, usize, usize)]| {
        shapes
            .iter()
            .map(|&(_, r, c)| {
                seed += 1;
                make_matrix(dtype, r, c, seed)
            })
            .collect::<Vec<_>>()
    };
    let mut model: Vec<Vec<Matrix>> = (0..LAYERS).map(|_| layer(&SHAPES[..4])).collect();
    model.push(layer(&SHAPES[4..]));
    model
}

/// Seconds per call of each of the five shapes: the fastest call of each over as many
/// whole steps at `m` rows as fit in `budget`. The fastest, not the mean, because the
/// figure of interest is what the kernels can do, and other processes on a 2-core machine
/// only ever make a call slower. Every call still reads its weights from DRAM: a step
/// cycles through ≈59 MB (bf16) of distinct matrices, more than the L3 holds.
fn time_steps(model: &[Vec<Matrix>], m: usize, budget: Duration) -> [f64; 5] {
    let x = values(m * INTER, 99);
    let mut out = vec![0.0f32; m * VOCAB];
    let mut best = [f64::INFINITY; 5];
    let mut steps = 0usize;
    let start = Instant::now();
    loop {
        for layer in model {
            for (i, w) in layer.iter().enumerate() {
                let slot = if layer.len() == 1 { 4 } else { i };
                let t = Instant::now();
                matmul(&x[..m * w.cols], m, w, None, &mut out[..m * w.rows]);
                let t = t.elapsed().as_secs_f64();
                // The first step warms the pool and the page tables.
                if steps > 0 {
                    best[slot] = best[slot].min(t);
                }
            }
        }
        steps += 1;
        if steps >= 3 && start.elapsed() > budget {
            break;
        }
    }
    best
}

/// FMA throughput of all kernel threads at once on a register-only loop (ten independent
/// accumulator chains, no memory): the compute roofline the GEMM numbers compare to.
#[cfg(target_arch = "x86_64")]
fn fma_peak_gflops(threads: usize) -> Option<f64> {
    if !is_x86_feature_detected!("avx2") || !is_x86_feature_detected!("fma") {
        return None;
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run(iters: usize) -> f32 {
        use std::arch::x86_64::*;
        let mut acc = [_mm256_set1_ps(0.0); 10];
        let (a, b) = (_mm256_set1_ps(0.999), _mm256_set1_ps(0.001));
        for _ in 0..iters {
            for acc in &mut acc {
                *acc = _mm256_fmadd_ps(*acc, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for v in acc {
            s = _mm256_add_ps(s, v);
        }
        _mm256_cvtss_f32(s)
    }
    let iters = 20_000_000;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        parallel_for(threads, |_| {
            // SAFETY: AVX2 and FMA were detected above.
            std::hint::black_box(unsafe { run(iters) });
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    // 10 chains × 8 lanes × 2 flops per iteration and thread.
    Some((threads * iters * 160) as f64 / best / 1e9)
}

#[cfg(not(target_arch = "x86_64"))]
fn fma_peak_gflops(_threads: usize) -> Option<f64> {
    None
}

/// Median round-trip of an empty job over all threads: hot (back to back) and after an
/// idle gap long enough for the workers to park.
fn dispatch_latency_us(mut dispatch: impl FnMut(), gap: Duration) -> f64 {
    let mut samples = Vec::new();
    for _ in 0..if gap.is_zero() { 20_000 } else { 200 } {
        if !gap.is_zero() {
            std::thread::sleep(gap);
        }
        let t = Instant::now();
        dispatch();
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn report_machine(threads: usize, json: &mut Json) {
    let bw = measure_read_bandwidth_gbs();
    println!("measured read bandwidth: {bw:.1} GB/s");
    let peak = fma_peak_gflops(threads);
    if let Some(p) = peak {
        println!("FMA peak (register-only loop on {threads} threads): {p:.0} GFLOP/s");
    }
    json.insert("read_bandwidth_gbs".into(), bw.into());
    json.insert("fma_peak_gflops".into(), peak.into());
}

fn report_dispatch(threads: usize, json: &mut Json) {
    let rayon_pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("rayon pool");
    let noop = |i: usize| {
        std::hint::black_box(i);
    };
    println!("\ndispatch of an empty job on {threads} threads (median µs):");
    println!("{:<22} {:>8} {:>12}", "", "hot", "after 2 ms");
    let ours = [Duration::ZERO, Duration::from_millis(2)]
        .map(|g| dispatch_latency_us(|| parallel_for(threads, noop), g));
    let theirs = [Duration::ZERO, Duration::from_millis(2)].map(|g| {
        dispatch_latency_us(
            || {
                rayon_pool.install(|| (0..threads).into_par_iter().for_each(noop));
            },
            g,
        )
    });
    println!(
        "{:<22} {:>8.2} {:>12.2}",
        "kernels::parallel_for", ours[0], ours[1]
    );
    println!(
        "{:<22} {:>8.2} {:>12.2}",
        "rayon par_iter", theirs[0], theirs[1]
    );
    json.insert(
        "dispatch_us".into(),
        serde_json::json!({
            "pool_hot": ours[0], "pool_parked": ours[1],
            "rayon_hot": theirs[0], "rayon_parked": theirs[1],
        }),
    );
}

fn main() {
    let args = parse_args();
    if let Some(t) = args.threads {
        set_num_threads(t);
    }
    let threads = num_threads();
    let mut json = Json::new();
    json.insert("threads".into(), threads.into());
    println!("kernel threads: {threads}");

    if !args.skip_setup {
        report_machine(threads, &mut json);
        report_dispatch(threads, &mut json);
    }

    let mut rows_json = Vec::new();
    for dtype in &args.dtypes {
        let dtype = dtype.as_str();
        let model = make_model(dtype);
        let step_bytes: usize = model.iter().flatten().map(Matrix::bytes).sum();
        println!(
            "\n{dtype} weights, {:.1} MB of matmul weights per step",
            step_bytes as f64 / 1e6
        );
        println!(
            "{:>4} {:<8} {:>13} {:>9} {:>9} {:>8}",
            "m", "matmul", "rows x cols", "µs/call", "GB/s", "GFLOP/s"
        );
        for &m in &args.ms {
            let times = time_steps(&model, m, args.budget);
            let mut step = 0.0;
            let mut flops = 0.0;
            for (i, &(name, r, c)) in SHAPES.iter().enumerate() {
                let w = &model[if i == 4 { LAYERS } else { 0 }][if i == 4 { 0 } else { i }];
                let t = times[i];
                let f = 2.0 * (m * r * c) as f64;
                let gbs = w.bytes() as f64 / t / 1e9;
                let gflops = f / t / 1e9;
                let calls = if i == 4 { 1.0 } else { LAYERS as f64 };
                step += t * calls;
                flops += f * calls;
                println!(
                    "{m:>4} {name:<8} {:>13} {:>9.1} {gbs:>9.1} {gflops:>8.1}",
                    format!("{r} x {c}"),
                    t * 1e6
                );
                rows_json.push(serde_json::json!({
                    "dtype": dtype, "m": m, "matmul": name, "rows": r, "cols": c,
                    "us": t * 1e6, "gbs": gbs, "gflops": gflops,
                }));
            }
            let lm = times[4];
            println!(
                "{m:>4} {:<8} {:>13} {:>9.1} {:>9.1} {:>8.1}   => {:.0} tokens/s from matmuls alone{}",
                "step",
                "",
                step * 1e6,
                step_bytes as f64 / step / 1e9,
                flops / step / 1e9,
                m as f64 / step,
                if m == 512 {
                    format!(
                        " ({:.0} as prefill, i.e. without lm_head)",
                        m as f64 / (step - lm)
                    )
                } else {
                    String::new()
                }
            );
            rows_json.push(serde_json::json!({
                "dtype": dtype, "m": m, "matmul": "step", "us": step * 1e6,
                "tokens_per_s": m as f64 / step,
                "prefill_tokens_per_s_without_lm_head": m as f64 / (step - lm),
            }));
        }
    }
    json.insert("results".into(), rows_json.into());
    if let Some(path) = args.json {
        let text = serde_json::to_string_pretty(&serde_json::Value::Object(json)).expect("json");
        std::fs::write(&path, text + "\n").expect("write --json file");
        println!("\nwrote {path}");
    }
}
