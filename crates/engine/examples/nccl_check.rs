//! NCCL on the GPU machine, from Rust: an all-reduce over every visible GPU, one process,
//! one communicator per GPU (what tensor parallelism will run after the attention output
//! and the MLP down-projection). Checks the sum and times it; needs two GPUs or more and
//! `libnccl.so.2` on the library path (PyTorch's wheel ships one; see
//! `scripts/gpu/check_and_bench.sh`). Run with NCCL_NVLS_ENABLE=0.
//!
//! ```text
//! nccl_check        # f32 and bf16, 4 KiB to 256 MiB per GPU
//! ```

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::safe::{group_end, group_start, Comm, NcclType, ReduceOp};

fn main() -> ExitCode {
    if std::env::var("NCCL_NVLS_ENABLE").as_deref() != Ok("0") {
        eprintln!("set NCCL_NVLS_ENABLE=0 (NVLink multicast must stay off on shared hosts)");
        return ExitCode::from(2);
    }
    let n = match CudaContext::device_count() {
        Ok(n) if n >= 2 => n as usize,
        Ok(n) => {
            eprintln!("nccl_check needs 2 GPUs or more, found {n}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("no CUDA driver: {e}");
            return ExitCode::from(2);
        }
    };
    let streams: Vec<Arc<CudaStream>> = (0..n)
        .map(|i| CudaContext::new(i).expect("CUDA context").default_stream())
        .collect();
    let comms = match Comm::from_devices(streams.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("NCCL communicators: {e:?} (is libnccl.so.2 on LD_LIBRARY_PATH?)");
            return ExitCode::FAILURE;
        }
    };
    println!("| dtype | bytes per GPU | GPUs | µs per all-reduce | bus GB/s | sum right |");
    println!("|---|---:|---:|---:|---:|---|");
    let mut ok = true;
    for bytes in [4usize << 10, 1 << 20, 16 << 20, 256 << 20] {
        ok &= run::<f32>(
            "f32",
            bytes / 4,
            &streams,
            &comms,
            |r| (r + 1) as f32,
            |x| x,
        );
        ok &= run::<half::bf16>(
            "bf16",
            bytes / 2,
            &streams,
            &comms,
            |r| half::bf16::from_f32((r + 1) as f32),
            half::bf16::to_f32,
        );
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Rank `r` contributes `value(r)` everywhere; every GPU must end with the sum over ranks.
fn run<T: NcclType + DeviceRepr + ValidAsZeroBits + Clone + Copy>(
    name: &str,
    len: usize,
    streams: &[Arc<CudaStream>],
    comms: &[Comm],
    value: impl Fn(usize) -> T,
    to_f32: impl Fn(T) -> f32,
) -> bool {
    let n = streams.len();
    let sends: Vec<CudaSlice<T>> = streams
        .iter()
        .enumerate()
        .map(|(r, s)| s.clone_htod(&vec![value(r); len]).expect("upload"))
        .collect();
    let mut recvs: Vec<CudaSlice<T>> = streams
        .iter()
        .map(|s| s.alloc_zeros::<T>(len).expect("alloc"))
        .collect();
    let all_reduce = |recvs: &mut [CudaSlice<T>]| {
        group_start().expect("ncclGroupStart");
        for ((c, s), r) in comms.iter().zip(&sends).zip(recvs.iter_mut()) {
            c.all_reduce(s, r, &ReduceOp::Sum).expect("ncclAllReduce");
        }
        group_end().expect("ncclGroupEnd");
        for s in streams {
            s.synchronize().expect("synchronize");
        }
    };
    all_reduce(&mut recvs); // warm-up: NCCL sets up its channels on first use
    let iters = if len * std::mem::size_of::<T>() >= 16 << 20 {
        10
    } else {
        100
    };
    let t = Instant::now();
    for _ in 0..iters {
        all_reduce(&mut recvs);
    }
    let secs = t.elapsed().as_secs_f64() / iters as f64;
    let want = (n * (n + 1) / 2) as f32;
    let right = recvs.iter().zip(streams).all(|(r, s)| {
        s.clone_dtoh(r)
            .expect("download")
            .into_iter()
            .all(|x| to_f32(x) == want)
    });
    let bytes = len * std::mem::size_of::<T>();
    // Ring all-reduce moves 2 (n - 1) / n of the buffer over each link.
    let bus = 2.0 * (n - 1) as f64 / n as f64 * bytes as f64 / secs / 1e9;
    println!(
        "| {name} | {bytes} | {n} | {:.1} | {bus:.1} | {} |",
        secs * 1e6,
        if right { "yes" } else { "NO" }
    );
    right
}
