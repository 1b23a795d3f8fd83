//! The all-reduce of a tensor-parallel group, checked and timed on the GPU machine: the
//! kernel of our own (`backend/cuda/allreduce.rs`) and NCCL, each rank on its own thread
//! as the engine runs them. Every rank must end with the exact sums (the inputs are small
//! integers, exact in bf16) and with the same bits as every other rank.
//!
//! ```text
//! allreduce_check                 # every visible GPU, one rank each (2 or more)
//! allreduce_check --shared-gpu W  # W ranks on GPU 0 (own kernel only): checks the
//!                                 # protocol on a single-GPU machine; timings mean little
//! allreduce_check --one           # one rank on GPU 0 with NCCL and the own kernel
//! ```
//!
//! Needs `libnccl.so` on the library path except with `--shared-gpu`
//! (`scripts/gpu/check_and_bench.sh` sets it up). Run with NCCL_NVLS_ENABLE=0.

use std::process::ExitCode;

use engine::backend::cuda::{AllReduceImpl, CudaBackend, CudaOptions};

/// Value counts: odd ones (scalar path), one value, a decode step's activations at batch 1
/// and 64 of an 8B model (4096 and 262,144), one staging buffer exactly and just past it
/// (two pieces), and a prefill chunk's worth.
const SIZES: [usize; 10] = [
    1,
    7,
    4096,
    4104,
    65_536,
    262_144,
    1 << 20,
    4 << 20,
    (4 << 20) + 8,
    16 << 20,
];

fn main() -> ExitCode {
    if std::env::var("NCCL_NVLS_ENABLE").as_deref() != Ok("0") {
        eprintln!("set NCCL_NVLS_ENABLE=0 (NVLink multicast must stay off on shared hosts)");
        return ExitCode::from(2);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--shared-gpu")
        && std::env::var_os("CUDA_MODULE_LOADING").is_none()
    {
        // Ranks sharing a GPU share its context: see `eager_module_loading` in tp_check.
        // SAFETY: the start of main, before any other thread exists.
        unsafe { std::env::set_var("CUDA_MODULE_LOADING", "EAGER") };
    }
    if std::env::var_os("SWITCHYARD_CUDA_OWN_ALLREDUCE").is_none() {
        // Groups go without the kernel of our own unless asked; this check is about it.
        // SAFETY: the start of main, before any other thread exists.
        unsafe { std::env::set_var("SWITCHYARD_CUDA_OWN_ALLREDUCE", "1") };
    }
    let opts = CudaOptions::default();
    let (label, group) = match args.first().map(String::as_str) {
        Some("--shared-gpu") => {
            let Some(w) = args.get(1).and_then(|s| s.parse::<usize>().ok()) else {
                eprintln!("usage: allreduce_check --shared-gpu WORLD");
                return ExitCode::from(2);
            };
            (
                format!("{w} ranks on GPU 0"),
                CudaBackend::shared_device_group(opts, 0, w),
            )
        }
        Some("--one") => (
            "1 rank on GPU 0".to_string(),
            CudaBackend::nccl_group(opts, &[0]),
        ),
        Some(other) => {
            eprintln!("unknown argument {other:?}");
            return ExitCode::from(2);
        }
        None => {
            let n = match cudarc::driver::CudaContext::device_count() {
                Ok(n) if n >= 2 => n as usize,
                Ok(n) => {
                    eprintln!("allreduce_check needs 2 GPUs or more (found {n}); see --shared-gpu");
                    return ExitCode::from(2);
                }
                Err(e) => {
                    eprintln!("no CUDA driver: {e}");
                    return ExitCode::from(2);
                }
            };
            let devices: Vec<usize> = (0..n).collect();
            (
                format!("{n} GPUs, one rank each"),
                CudaBackend::tp_group(opts, &devices),
            )
        }
    };
    let mut ranks = match group {
        Ok(g) => g,
        Err(e) => {
            eprintln!("{label}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let world = ranks.len();
    let own = ranks.iter().all(|r| r.has_own_all_reduce());
    println!("{label}: own all-reduce {}", if own { "on" } else { "off" });
    let mut ok = own || args.is_empty();
    println!("| values | bytes | own kernel µs | NCCL µs | exact on every rank |");
    println!("|---:|---:|---:|---:|---|");
    for n in SIZES {
        let mut row = Vec::new();
        let mut exact = true;
        for which in [AllReduceImpl::Own, AllReduceImpl::Nccl] {
            let nccl_only = which == AllReduceImpl::Nccl;
            if nccl_only && args.first().map(String::as_str) == Some("--shared-gpu") {
                row.push("—".to_string());
                continue;
            }
            for r in &ranks {
                r.set_all_reduce(which);
            }
            let iters = if n >= 1 << 20 { 20 } else { 200 };
            let results: Vec<_> = std::thread::scope(|s| {
                let handles: Vec<_> = ranks
                    .iter_mut()
                    .enumerate()
                    .map(|(rank, b)| s.spawn(move || b.all_reduce_check(&input(n, rank), iters)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let want = expected(n, world);
            let mut worst = 0.0f64;
            for (rank, r) in results.iter().enumerate() {
                match r {
                    Ok((out, us)) => {
                        worst = worst.max(*us);
                        if *out != want {
                            let bad = out.iter().zip(&want).position(|(a, b)| a != b);
                            eprintln!(
                                "{which:?}, {n} values, rank {rank}: first wrong value at {bad:?}"
                            );
                            exact = false;
                        }
                    }
                    Err(e) => {
                        eprintln!("{which:?}, {n} values, rank {rank}: {e}");
                        exact = false;
                    }
                }
            }
            row.push(format!("{worst:.1}"));
        }
        ok &= exact;
        println!(
            "| {n} | {} | {} | {} | {} |",
            2 * n,
            row[0],
            row[1],
            if exact { "yes" } else { "NO" }
        );
    }
    ok &= gather_table(
        &mut ranks,
        args.first().map(String::as_str) == Some("--shared-gpu"),
    );
    for r in &ranks {
        r.set_all_reduce(AllReduceImpl::Auto);
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The output layer's all-gather: each rank's share of the logit columns of `rows` rows
/// (`ceil(vocab / world)` columns, the last rank's padded), gathered into `vocab` columns
/// on every rank. Vocabularies: odd (the scalar path), small, and Llama 3's; 257 rows of
/// the last do not fit one staging buffer, so they run in pieces.
fn gather_table(ranks: &mut [CudaBackend], shared: bool) -> bool {
    let world = ranks.len();
    let mut ok = true;
    println!();
    println!("| rows | vocab | columns per rank | own kernel | NCCL |");
    println!("|---:|---:|---:|---|---|");
    let cases: [(usize, usize); 5] = [
        (1, 13),
        (3, 1000),
        (1, 128_256),
        (64, 128_256),
        (257, 128_256),
    ];
    for (rows, vocab) in cases {
        let c = vocab.div_ceil(world);
        let mut row = Vec::new();
        for which in [AllReduceImpl::Own, AllReduceImpl::Nccl] {
            if which == AllReduceImpl::Nccl && shared {
                row.push("—");
                continue;
            }
            for r in ranks.iter() {
                r.set_all_reduce(which);
            }
            let results: Vec<_> = std::thread::scope(|s| {
                let handles: Vec<_> = ranks
                    .iter_mut()
                    .enumerate()
                    .map(|(rank, b)| {
                        let block = gather_block(rows, c, rank);
                        s.spawn(move || b.all_gather_check(&block, rows, c, vocab))
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let want: Vec<u16> = (0..rows)
                .flat_map(|r| (0..vocab).map(move |col| gather_value(r, col % c, col / c)))
                .collect();
            let mut exact = true;
            for (rank, got) in results.iter().enumerate() {
                match got {
                    Ok(got) if *got == want => {}
                    Ok(got) => {
                        let bad = got.iter().zip(&want).position(|(a, b)| a != b);
                        eprintln!("gather {which:?}, {rows}x{vocab}, rank {rank}: first wrong value at {bad:?}");
                        exact = false;
                    }
                    Err(e) => {
                        eprintln!("gather {which:?}, {rows}x{vocab}, rank {rank}: {e}");
                        exact = false;
                    }
                }
            }
            ok &= exact;
            row.push(if exact { "exact" } else { "WRONG" });
        }
        println!("| {rows} | {vocab} | {c} | {} | {} |", row[0], row[1]);
    }
    ok
}

/// Rank `q`'s block: `[rows, c]`, integers below 256 (exact in bf16), different per rank;
/// its padding columns (past the vocabulary) hold values too, which must not arrive.
fn gather_block(rows: usize, c: usize, q: usize) -> Vec<u16> {
    (0..rows)
        .flat_map(|r| (0..c).map(move |j| gather_value(r, j, q)))
        .collect()
}

fn gather_value(r: usize, j: usize, q: usize) -> u16 {
    bf16_bits(((r * 131 + j * 7 + q * 3) % 251) as f32)
}

/// Rank `rank`'s values: small integers (exact in bf16, and so are their sums).
fn input(n: usize, rank: usize) -> Vec<u16> {
    (0..n)
        .map(|i| bf16_bits(((i * 7 + rank * 3) % 17) as f32 - 8.0))
        .collect()
}

fn expected(n: usize, world: usize) -> Vec<u16> {
    (0..n)
        .map(|i| {
            let s: f32 = (0..world)
                .map(|r| ((i * 7 + r * 3) % 17) as f32 - 8.0)
                .sum();
            bf16_bits(s)
        })
        .collect()
}

/// `x` as bf16 bits; exact for the small integers used here.
fn bf16_bits(x: f32) -> u16 {
    (x.to_bits() >> 16) as u16
}
