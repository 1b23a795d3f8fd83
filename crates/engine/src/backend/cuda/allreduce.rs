//! An all-reduce of our own for the ranks of one tensor-parallel group, which all live in
//! this process: one kernel per call that reads the other ranks' values straight from
//! their memory (peer access over NVLink, or the same memory when ranks share a GPU).
//!
//! A decode step all-reduces two small activations per layer (batch × hidden values),
//! where NCCL's ring pays several launches' worth of latency per call. One pass over peer
//! memory is what the 1.7× target at batch 64 needs (docs/gpu.md). Each rank copies its
//! values into a staging buffer, raises a flag on every rank, waits for every rank's flag,
//! and sums the staging buffers in rank order in f32: every rank ends with the same bits.
//! The protocol is in the kernel's comment (`custom_all_reduce` in `kernels.cu`).
//!
//! It also lets ranks share one GPU (`CudaBackend::shared_device_group`), where NCCL
//! refuses to run: the whole multi-rank path can then be checked on a single-GPU machine.

use cudarc::driver::{sys as drv, CudaSlice};

use super::{CudaBackend, CudaError, A};

/// Must match `AR_MAX_RANKS` and `AR_BLOCKS` in `kernels.cu`.
pub(super) const MAX_RANKS: usize = 8;
const BLOCKS: usize = 32;
const THREADS: u32 = 512;

/// Values per staging buffer; larger all-reduces run in pieces.
pub(super) const STAGE_VALUES: usize = 4 << 20;

/// One rank's share: its staging buffers and flags (which the other ranks write and read),
/// and the table of every rank's addresses, in its own memory.
pub(super) struct CustomAr {
    pub(super) rank: usize,
    pub(super) world: usize,
    _stage: [CudaSlice<u16>; 2],
    _flags: CudaSlice<u32>,
    table: CudaSlice<u64>,
}

/// Whether every pair of `devices` can reach each other's memory (a device can always
/// reach its own), enabling peer access where it is off.
fn enable_peer_access(backends: &[CudaBackend]) -> Result<(), CudaError> {
    for a in backends {
        for b in backends {
            let (da, db) = (a.opts.device, b.opts.device);
            if da == db {
                continue;
            }
            let mut can = 0;
            // SAFETY: out-parameter and two valid device handles.
            let r = unsafe {
                drv::cuDeviceCanAccessPeer(&mut can, a.ctx.cu_device(), b.ctx.cu_device())
            };
            if r != drv::CUresult::CUDA_SUCCESS || can == 0 {
                return Err(CudaError::Unavailable(format!(
                    "GPU {da} cannot access GPU {db}'s memory ({r:?})"
                )));
            }
            a.ctx
                .bind_to_thread()
                .map_err(|e| CudaError::Device(format!("binding GPU {da}: {e:?}")))?;
            // SAFETY: `a`'s context is current; `b`'s context is alive.
            let r = unsafe { drv::cuCtxEnablePeerAccess(b.ctx.cu_ctx(), 0) };
            if r != drv::CUresult::CUDA_SUCCESS
                && r != drv::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED
            {
                return Err(CudaError::Device(format!(
                    "enabling GPU {da}'s access to GPU {db}: {r:?}"
                )));
            }
        }
    }
    Ok(())
}

/// Joins `backends` (rank r at index r) with the all-reduce of our own.
pub(super) fn join(backends: &mut [CudaBackend]) -> Result<(), CudaError> {
    let world = backends.len();
    if world > MAX_RANKS {
        return Err(CudaError::Unavailable(format!(
            "the all-reduce of our own joins at most {MAX_RANKS} ranks, not {world}"
        )));
    }
    enable_peer_access(backends)?;
    let mut parts = Vec::with_capacity(world);
    for b in backends.iter() {
        let staging = || {
            // SAFETY: staging buffers are written before they are read (each call copies
            // its values in first).
            unsafe { b.stream.alloc::<u16>(STAGE_VALUES) }
                .map_err(|e| CudaError::Device(format!("all-reduce staging buffer: {e:?}")))
        };
        let stage = [staging()?, staging()?];
        let flags = b
            .stream
            .alloc_zeros::<u32>(MAX_RANKS * BLOCKS)
            .map_err(|e| CudaError::Device(format!("all-reduce flags: {e:?}")))?;
        parts.push((stage, flags));
    }
    let mut table = Vec::with_capacity(world * 3);
    for (b, (stage, flags)) in backends.iter().zip(&parts) {
        table.extend([b.ptr(&stage[0]), b.ptr(&stage[1]), b.ptr(flags)]);
    }
    for (rank, (b, (stage, flags))) in backends.iter_mut().zip(parts).enumerate() {
        let dev_table = b
            .stream
            .clone_htod(&table)
            .map_err(|e| CudaError::Device(format!("all-reduce table: {e:?}")))?;
        b.synchronize()?;
        b.car = Some(CustomAr {
            rank,
            world,
            _stage: stage,
            _flags: flags,
            table: dev_table,
        });
    }
    Ok(())
}

impl CudaBackend {
    /// The group's `[rows, c]` blocks at `local` side by side in `out` (`[rows, cols]`,
    /// rank order, columns past `cols` dropped), in pieces of whole rows that fit one
    /// staging buffer. Every rank must make the same calls.
    pub(super) fn custom_all_gather(
        &self,
        car: &CustomAr,
        local: u64,
        rows: usize,
        c: usize,
        out: u64,
        cols: usize,
    ) {
        let per = (STAGE_VALUES / c.max(1)).max(1);
        let vec = i32::from(
            c.is_multiple_of(8)
                && cols.is_multiple_of(8)
                && local.is_multiple_of(16)
                && out.is_multiple_of(16),
        );
        let mut r0 = 0;
        while r0 < rows {
            let n = (rows - r0).min(per);
            self.launch(
                &self.k.custom_all_gather,
                (BLOCKS as u32, 1, 1),
                THREADS,
                &[
                    A::P(local + 2 * (r0 * c) as u64),
                    A::I(n as i32),
                    A::I(c as i32),
                    A::P(out + 2 * (r0 * cols) as u64),
                    A::I(cols as i32),
                    A::I(car.rank as i32),
                    A::I(car.world as i32),
                    A::P(self.ptr(&car.table)),
                    A::I(vec),
                ],
                "custom_all_gather",
            );
            r0 += n;
        }
    }

    /// Sums the `n` bf16 values at `ptr` over the group with the kernel of our own, in
    /// pieces of at most one staging buffer. Every rank must make the same calls.
    pub(super) fn custom_all_reduce(&self, car: &CustomAr, ptr: u64, n: usize) {
        let mut done = 0;
        while done < n {
            let len = (n - done).min(STAGE_VALUES);
            let at = ptr + 2 * done as u64;
            // 16-byte groups when the piece allows; the staging buffers are aligned.
            let vec = i32::from(len.is_multiple_of(8) && at.is_multiple_of(16));
            self.launch(
                &self.k.custom_all_reduce,
                (BLOCKS as u32, 1, 1),
                THREADS,
                &[
                    A::P(at),
                    A::I(len as i32),
                    A::I(car.rank as i32),
                    A::I(car.world as i32),
                    A::P(self.ptr(&car.table)),
                    A::I(vec),
                ],
                "custom_all_reduce",
            );
            done += len;
        }
    }
}
