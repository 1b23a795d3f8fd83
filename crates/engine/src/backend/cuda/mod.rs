//! The CUDA backend: bf16 weights, activations and KV cache on one NVIDIA GPU (compute
//! capability 8.0+), GEMMs through cuBLAS, everything else in our own kernels
//! (`kernels/kernels.cu`, compiled by NVRTC at start and cached on disk, see [`module`]).
//!
//! Nothing CUDA is needed to build it: cudarc `dlopen()`s libcuda, libcublas and libnvrtc
//! at run time. [`CudaBackend::new`] checks that they are present first and reports a
//! missing one as one [`CudaError::Unavailable`] line instead of cudarc's panic.
//!
//! It mirrors the CPU backend operation for operation (same KV layout
//! `[block][kv_head][offset][head_dim]` per layer, same RoPE pairing), so the CPU backend is
//! its reference in `scripts/gpu/check_and_bench.sh`. The [`Backend`] methods cannot return
//! errors; a CUDA call that fails mid-step (a device fault, not a missing device) panics
//! with the call's name and the driver's error, which ends the engine thread.

mod allreduce;
mod graph;
mod module;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::driver::{sys as drv, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr};
use graph::{DecodeGraph, Recording};

use super::{AttnLayout, Backend, ForwardBatch, KvCacheSpec, QkNorm, RowSampling};
use crate::model::{DType, HostTensor, ModelError};
use module::{gemv_cols_per_warp, Kernels, GEMV_MAX_ROWS, GEMV_WARPS, GROUPS, HEAD_DIMS};

/// Why the CUDA backend could not start or run, grouped by what the user can do about it.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No usable GPU or CUDA library on this machine: install it or use `--device cpu`.
    #[error("CUDA is not available: {0}")]
    Unavailable(String),
    /// The device refused an operation (out of memory, a kernel that failed to build).
    #[error("CUDA: {0}")]
    Device(String),
}

impl From<CudaError> for ModelError {
    fn from(e: CudaError) -> Self {
        ModelError::Backend(e.to_string())
    }
}

/// How to open the device.
#[derive(Clone, Debug)]
pub struct CudaOptions {
    /// CUDA device ordinal.
    pub device: usize,
    /// Fraction of the GPU's memory this process may use (weights, KV cache, activations).
    pub gpu_memory_utilization: f32,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            device: 0,
            gpu_memory_utilization: 0.9,
        }
    }
}

/// Memory kept out of the KV cache for activations, cuBLAS workspaces and decode partials
/// (a 2048-token step of an 8B model needs about 0.4 GiB).
const ACTIVATION_RESERVE: usize = 2 << 30;

/// Query rows per prefill-attention block (must match `prefill_attn` in the kernels).
const PREFILL_TILE: usize = 64;

fn check<T, E: std::fmt::Debug>(r: Result<T, E>, what: &str) -> T {
    match r {
        Ok(v) => v,
        // The Backend trait is infallible by design (see the module docs).
        Err(e) => panic!("CUDA error in {what}: {e:?}"),
    }
}

/// Is every library the backend needs loadable? One line naming the first one missing.
pub fn probe_libraries() -> Result<(), CudaError> {
    // SAFETY: these only try to dlopen() the libraries.
    let (cuda, blas, nvrtc) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
        )
    };
    if !cuda {
        return Err(CudaError::Unavailable(
            "libcuda.so (the NVIDIA driver) was not found on the loader path".into(),
        ));
    }
    if !blas {
        return Err(CudaError::Unavailable(
            "libcublas.so.13 was not found: put the CUDA 13 toolkit's lib directory on \
             LD_LIBRARY_PATH"
                .into(),
        ));
    }
    if !nvrtc {
        return Err(CudaError::Unavailable(
            "libnvrtc.so.13 was not found: put the CUDA 13 toolkit's lib directory on \
             LD_LIBRARY_PATH"
                .into(),
        ));
    }
    Ok(())
}

/// What [`CudaBackend::gemv_check`] measured for one shape.
#[derive(Clone, Debug)]
pub struct GemvReport {
    /// ‖gemv − ref‖ / ‖ref‖ against the f64 host reference (sampled columns).
    pub rel_err_gemv: f64,
    /// ‖cuBLAS − ref‖ / ‖ref‖, the same columns.
    pub rel_err_cublas: f64,
    /// ‖gemv − cuBLAS‖ / ‖cuBLAS‖, the same columns.
    pub rel_diff_gemv_cublas: f64,
    /// Every output element of the kernel was written (finite after NaN poisoning).
    pub all_written: bool,
    /// Median time per call, microseconds.
    pub gemv_us: f64,
    pub cublas_us: f64,
    /// Bytes of the weight matrix (the traffic that bounds both).
    pub weight_bytes: usize,
}

/// Row-major bf16 activations; the buffer keeps its capacity across reshapes.
pub struct CudaAct {
    pub rows: usize,
    pub cols: usize,
    buf: ActBuf,
}

/// An activation's memory: its own, or a slot of a decode graph's arena (fixed addresses
/// that the graph's kernels were recorded with; the graph owns them).
enum ActBuf {
    Own(CudaSlice<u16>),
    Arena { ptr: u64, len: usize },
}

impl ActBuf {
    fn len(&self) -> usize {
        match self {
            ActBuf::Own(b) => b.len(),
            ActBuf::Arena { len, .. } => *len,
        }
    }
}

/// A bf16 weight matrix `[rows (out), cols (in)]`.
pub struct CudaWeight {
    rows: usize,
    cols: usize,
    buf: CudaSlice<u16>,
}

/// An f32 parameter vector (norm weights, biases): small, and kept exact.
pub struct CudaVector {
    len: usize,
    buf: CudaSlice<f32>,
}

/// Paged bf16 KV cache: K and V each `[layer][block][kv_head][offset][head_dim]`.
pub struct CudaKvCache {
    spec: KvCacheSpec,
    layer_elems: usize,
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
}

/// One step's metadata, uploaded in a single copy: every table lives in `meta` at the
/// offsets (in u32 elements) below.
pub struct CudaStep {
    /// Device address of the metadata: `own`'s, or a decode graph's fixed buffer.
    meta: u64,
    _own: Option<CudaSlice<u32>>,
    n_tokens: usize,
    n_logit_rows: usize,
    token_ids: usize,
    positions: usize,
    slots: usize,
    logit_rows: usize,
    inv_freq: usize,
    /// Decode sequences (q_len == 1): 4 u32 each (row, 1, ctx_len, block-table offset).
    dec_info: usize,
    n_dec: usize,
    /// Tokens per decode context split, and the most splits any sequence needs.
    dec_part: usize,
    dec_max_splits: usize,
    /// Prefill sequences: 4 u32 each (q_start, q_len, ctx_len, block-table offset).
    pre_info: usize,
    /// Prefill blocks: 2 u32 each (prefill sequence index, first query row).
    tiles: usize,
    n_tiles: usize,
}

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    opts: CudaOptions,
    num_sms: usize,
    /// Decode split partials (f32 accumulators, then max/sum pairs), grown on demand.
    partials: RefCell<Option<(CudaSlice<f32>, CudaSlice<f32>)>>,
    /// Whether pure decode steps run as CUDA graphs (`SWITCHYARD_CUDA_GRAPHS=0` turns off).
    graphs_on: Cell<bool>,
    /// Whether matmuls of at most `GEMV_MAX_ROWS` rows use the skinny-GEMM kernels rather
    /// than cuBLAS (`SWITCHYARD_CUDA_GEMV=0` turns them off).
    gemv_on: Cell<bool>,
    /// Whether non-greedy sampling runs on the device (`SWITCHYARD_CUDA_SAMPLING=0` turns
    /// it off: the logits are copied to the host sampler).
    sampling_on: Cell<bool>,
    /// One recorded decode step per batch bucket.
    graphs: RefCell<HashMap<usize, DecodeGraph>>,
    /// The recording in progress, if any: allocations and metadata come from it.
    rec: RefCell<Option<Recording>>,
    /// cuBLAS's workspace, set explicitly so that captured GEMMs allocate nothing.
    _blas_workspace: CudaSlice<u8>,
    /// This backend's NCCL communicator when it is one rank of a tensor-parallel group
    /// (`CudaBackend::tp_group`).
    nccl: Option<NcclComm>,
    /// This rank's share of the group's all-reduce of our own (`allreduce.rs`).
    car: Option<allreduce::CustomAr>,
    /// Which all-reduce a group member uses.
    ar_choice: Cell<AllReduceImpl>,
    /// Ranks in this backend's tensor-parallel group (1 outside any).
    world: usize,
    /// Ranks sharing one GPU (`shared_device_group`) meet here before launching a kernel
    /// that waits for the others (see `meet_before_waiting`).
    shared_gpu: Option<Arc<std::sync::Barrier>>,
}

/// Which all-reduce the ranks of a group use (`CudaBackend::set_all_reduce`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllReduceImpl {
    /// The kernel of our own for messages it does in one piece (all of them when the group
    /// has no NCCL), NCCL for larger ones.
    Auto,
    /// NCCL only (when the group has it).
    Nccl,
    /// The kernel of our own only (when the group has it), in pieces if need be.
    Own,
}

/// An NCCL communicator, destroyed with the backend.
struct NcclComm(cudarc::nccl::sys::ncclComm_t);

// SAFETY: a communicator may be used from any thread, one thread at a time; the backend
// that owns it is used by one thread at a time (it is not `Sync`).
unsafe impl Send for NcclComm {}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: created by ncclCommInitAll and destroyed once, here.
        let _ = unsafe { cudarc::nccl::result::comm_destroy(self.0) };
    }
}

/// A kernel argument, passed by value in an 8-byte slot (a 4-byte parameter reads the low
/// half, which is where little-endian puts it).
#[derive(Clone, Copy)]
enum A {
    P(u64),
    I(i32),
    F(f32),
    L(i64),
}

impl A {
    fn slot(self) -> u64 {
        match self {
            A::P(p) => p,
            A::I(i) => i as u32 as u64,
            A::F(f) => f.to_bits() as u64,
            A::L(l) => l as u64,
        }
    }
}

/// GPU groups add the all-reduce of our own with `SWITCHYARD_CUDA_OWN_ALLREDUCE=1`. Off by
/// default until it has run on several GPUs (it has run on ranks sharing one GPU only);
/// groups of ranks sharing a GPU always have it.
fn own_all_reduce_wanted() -> bool {
    std::env::var("SWITCHYARD_CUDA_OWN_ALLREDUCE").is_ok_and(|v| v == "1")
}

fn grid(n: usize, per: usize) -> u32 {
    n.div_ceil(per).max(1) as u32
}

impl CudaBackend {
    /// Opens `opts.device`, compiles (or loads cached) kernels and creates the cuBLAS handle.
    pub fn new(opts: CudaOptions) -> Result<Self, CudaError> {
        probe_libraries()?;
        if !(0.05..=1.0).contains(&opts.gpu_memory_utilization) {
            return Err(CudaError::Unavailable(format!(
                "gpu_memory_utilization must be in [0.05, 1], got {}",
                opts.gpu_memory_utilization
            )));
        }
        let count = CudaContext::device_count()
            .map_err(|e| CudaError::Unavailable(format!("no CUDA device: {e:?}")))?;
        if opts.device >= count.max(0) as usize {
            return Err(CudaError::Unavailable(format!(
                "device {} requested, {count} present",
                opts.device
            )));
        }
        let ctx = CudaContext::new(opts.device).map_err(|e| {
            CudaError::Unavailable(format!("opening device {}: {e:?}", opts.device))
        })?;
        // One stream orders everything, so cudarc's per-buffer event tracking is pure cost.
        // SAFETY: set before any buffer exists; nothing here uses a second stream.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own: the legacy default stream cannot be captured into a graph.
        let stream = ctx
            .new_stream()
            .map_err(|e| CudaError::Device(format!("creating a stream: {e:?}")))?;
        keep_pool_memory(&ctx)?;
        let k = Kernels::load(&ctx)?;
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| CudaError::Device(format!("creating the cuBLAS handle: {e:?}")))?;
        let ws_bytes = 32 << 20;
        // SAFETY: cuBLAS's scratch space; it initialises what it reads.
        let blas_workspace = unsafe { stream.alloc::<u8>(ws_bytes) }
            .map_err(|e| CudaError::Device(format!("cuBLAS workspace: {e:?}")))?;
        {
            let (ws, _g) = blas_workspace.device_ptr(&stream);
            // SAFETY: the buffer outlives the handle (both live in the backend).
            let r = unsafe {
                blas_sys::cublasSetWorkspace_v2(*blas.handle(), ws as *mut c_void, ws_bytes)
            };
            if r != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(CudaError::Device(format!("cublasSetWorkspace: {r:?}")));
            }
        }
        let graphs_on = std::env::var("SWITCHYARD_CUDA_GRAPHS").map_or(true, |v| v != "0");
        let gemv_on = std::env::var("SWITCHYARD_CUDA_GEMV").map_or(true, |v| v != "0");
        let num_sms = ctx
            .attribute(drv::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| CudaError::Device(format!("{e:?}")))? as usize;
        Ok(CudaBackend {
            ctx,
            stream,
            blas,
            k,
            opts,
            num_sms,
            partials: RefCell::new(None),
            graphs_on: Cell::new(graphs_on),
            gemv_on: Cell::new(gemv_on),
            sampling_on: Cell::new(
                std::env::var("SWITCHYARD_CUDA_SAMPLING").map_or(true, |v| v != "0"),
            ),
            graphs: RefCell::new(HashMap::new()),
            rec: RefCell::new(None),
            _blas_workspace: blas_workspace,
            nccl: None,
            car: None,
            ar_choice: Cell::new(AllReduceImpl::Auto),
            world: 1,
            shared_gpu: None,
        })
    }

    /// One backend per device of `devices`, joined as the ranks of a tensor-parallel group
    /// (rank r on `devices[r]`) by NCCL communicators and, with
    /// `SWITCHYARD_CUDA_OWN_ALLREDUCE=1` and GPUs that reach each other's memory, by the
    /// all-reduce of our own (`allreduce.rs`). A single device needs neither and gets none.
    /// Decode steps are recorded as CUDA graphs with their all-reduces inside, as on one
    /// GPU: every rank records the same bucket in the same step, and its eager sizing run
    /// pairs the ranks' all-reduces up before the capture.
    pub fn tp_group(opts: CudaOptions, devices: &[usize]) -> Result<Vec<Self>, CudaError> {
        if devices.len() == 1 {
            return Ok(vec![CudaBackend::new(CudaOptions {
                device: devices[0],
                ..opts
            })?]);
        }
        Self::group(opts, devices, true, own_all_reduce_wanted())
    }

    /// [`tp_group`](Self::tp_group), with NCCL communicators even for one device: a group
    /// of one on a single-GPU machine runs every all-reduce call of the tensor-parallel
    /// path (a copy onto itself), eagerly and inside graphs, for checks.
    pub fn nccl_group(opts: CudaOptions, devices: &[usize]) -> Result<Vec<Self>, CudaError> {
        Self::group(opts, devices, true, own_all_reduce_wanted())
    }

    /// `world` ranks on one GPU, each with its own stream, joined by the all-reduce of our
    /// own (NCCL refuses two ranks on one device). For checking the multi-rank path on a
    /// single-GPU machine: the ranks share the GPU, so it is no faster than one rank, and
    /// each rank's KV cache needs an explicit size (`EngineOptions::num_blocks`).
    pub fn shared_device_group(
        opts: CudaOptions,
        device: usize,
        world: usize,
    ) -> Result<Vec<Self>, CudaError> {
        let mut group = Self::group(opts, &vec![device; world], false, true)?;
        let meet = Arc::new(std::sync::Barrier::new(group.len()));
        for b in &mut group {
            b.shared_gpu = Some(Arc::clone(&meet));
        }
        Ok(group)
    }

    /// Ranks sharing a GPU share its context, and some driver calls (loading a kernel on
    /// first use, cuBLAS's included; perhaps uploading a graph) wait for the context's
    /// running kernels. If one rank's kernel is already waiting for the others in a collective
    /// while another rank is in such a call, neither moves: the hang docs/gpu.md recorded
    /// for the 8b model. So on a shared GPU every rank finishes what it launches before a
    /// collective (or a graph holding collectives) before any of them launches it. Ranks
    /// on separate GPUs have separate contexts and skip this.
    fn meet_before_waiting(&self) {
        if let Some(meet) = &self.shared_gpu {
            meet.wait();
        }
    }

    fn group(
        opts: CudaOptions,
        devices: &[usize],
        nccl: bool,
        own: bool,
    ) -> Result<Vec<Self>, CudaError> {
        if devices.is_empty() {
            return Err(CudaError::Unavailable("a TP group needs a device".into()));
        }
        let mut backends = Vec::with_capacity(devices.len());
        for &device in devices {
            let mut b = CudaBackend::new(CudaOptions { device, ..opts })?;
            b.world = devices.len();
            backends.push(b);
        }
        if nccl {
            let ordinals: Vec<i32> = devices.iter().map(|&d| d as i32).collect();
            let mut comms = vec![std::ptr::null_mut(); devices.len()];
            // SAFETY: one slot per device in `ordinals`, which stay alive for the call.
            unsafe {
                cudarc::nccl::result::comm_init_all(
                    comms.as_mut_ptr(),
                    ordinals.len() as i32,
                    ordinals.as_ptr(),
                )
            }
            .map_err(|e| {
                CudaError::Unavailable(format!(
                    "NCCL over devices {devices:?}: {e:?} (is libnccl.so on the library path?)"
                ))
            })?;
            for (b, comm) in backends.iter_mut().zip(comms) {
                b.nccl = Some(NcclComm(comm));
            }
        }
        if own {
            match allreduce::join(&mut backends) {
                Ok(()) => {}
                Err(e) if nccl => {
                    tracing::warn!("all-reduce of our own unavailable ({e}); using NCCL alone")
                }
                Err(e) => return Err(e),
            }
        }
        Ok(backends)
    }

    /// Picks the all-reduce this rank uses (every rank of a group must pick the same).
    /// A choice the group lacks falls back to the one it has. Recorded decode graphs hold
    /// the all-reduce they were recorded with, so this drops them.
    pub fn set_all_reduce(&self, which: AllReduceImpl) {
        self.ar_choice.set(which);
        self.graphs.borrow_mut().clear();
    }

    /// Whether this backend is a group member with the all-reduce of our own.
    pub fn has_own_all_reduce(&self) -> bool {
        self.car.is_some()
    }

    /// For checks: all-reduces `host` (bf16 bits) over the group once and returns the
    /// result, then times `iters` more calls on the same buffer (µs per call, wall time
    /// between two synchronisations). Every rank must call this at the same time with
    /// the same length.
    pub fn all_reduce_check(
        &self,
        host: &[u16],
        iters: usize,
    ) -> Result<(Vec<u16>, f64), CudaError> {
        let dev = |e| CudaError::Device(format!("all-reduce check: {e:?}"));
        let buf = self.stream.clone_htod(host).map_err(dev)?;
        let ptr = self.ptr(&buf);
        self.all_reduce_raw(ptr, host.len());
        let out = self.stream.clone_dtoh(&buf).map_err(dev)?;
        self.synchronize()?;
        let t = std::time::Instant::now();
        for _ in 0..iters {
            self.all_reduce_raw(ptr, host.len());
        }
        self.synchronize()?;
        let us = t.elapsed().as_secs_f64() * 1e6 / iters.max(1) as f64;
        Ok((out, us))
    }

    /// For checks: the output layer's all-gather (`Backend::all_gather_cols`) of this
    /// rank's `[rows, c]` block (`block`, bf16 bits) into `[rows, cols]`, returned as bits.
    /// Every rank must call this at the same time with the same shapes.
    pub fn all_gather_check(
        &self,
        block: &[u16],
        rows: usize,
        c: usize,
        cols: usize,
    ) -> Result<Vec<u16>, CudaError> {
        let dev = |e| CudaError::Device(format!("all-gather check: {e:?}"));
        let local = CudaAct {
            rows,
            cols: c,
            buf: ActBuf::Own(self.stream.clone_htod(block).map_err(dev)?),
        };
        let mut out = self.alloc(rows, cols);
        self.all_gather_cols(&local, &mut out);
        let host = match &out.buf {
            ActBuf::Own(b) => self.stream.clone_dtoh(b).map_err(dev)?,
            ActBuf::Arena { .. } => unreachable!("no graph is being recorded"),
        };
        self.synchronize()?;
        Ok(host[..rows * cols].to_vec())
    }

    /// The all-reduce of `n` bf16 values at `ptr`, through the implementation chosen.
    fn all_reduce_raw(&self, ptr: u64, n: usize) {
        let own = self.car.as_ref().filter(|car| match self.ar_choice.get() {
            AllReduceImpl::Own => true,
            AllReduceImpl::Nccl => self.nccl.is_none(),
            // One piece; with more than two ranks a one-pass read of every peer moves
            // more bytes than NCCL's ring once messages are large.
            AllReduceImpl::Auto => {
                self.nccl.is_none()
                    || n <= if car.world <= 2 {
                        allreduce::STAGE_VALUES
                    } else {
                        allreduce::STAGE_VALUES / 8
                    }
            }
        });
        if let Some(car) = own {
            self.meet_before_waiting();
            self.custom_all_reduce(car, ptr, n);
            return;
        }
        let Some(comm) = &self.nccl else {
            return;
        };
        // SAFETY: `ptr` holds `n` bf16 values on this backend's device, and the all-reduce
        // is ordered on its stream like every other operation on them.
        let r = unsafe {
            cudarc::nccl::result::all_reduce(
                ptr as *mut c_void,
                ptr as *mut c_void,
                n,
                cudarc::nccl::sys::ncclDataType_t::ncclBfloat16,
                cudarc::nccl::sys::ncclRedOp_t::ncclSum,
                comm.0,
                self.stream.cu_stream() as _,
            )
        };
        if let Err(e) = r {
            // Ranks out of step cannot be recovered within a step.
            panic!("NCCL all-reduce failed: {e:?}");
        }
    }

    /// Turns CUDA graphs for decode steps on or off (default on unless
    /// `SWITCHYARD_CUDA_GRAPHS=0`). Turning them off drops the recorded graphs.
    pub fn set_cuda_graphs(&self, on: bool) {
        self.graphs_on.set(on);
        if !on {
            self.graphs.borrow_mut().clear();
        }
    }

    /// Turns the skinny-GEMM kernels for matmuls of at most 8 rows on or off (default on
    /// unless `SWITCHYARD_CUDA_GEMV=0`); off, every matmul goes to cuBLAS. Recorded decode
    /// graphs keep the kernels they were recorded with, so this drops them.
    pub fn set_gemv(&self, on: bool) {
        self.gemv_on.set(on);
        self.graphs.borrow_mut().clear();
    }

    /// Turns device sampling (temperature, top-k, top-p, min-p) on or off (default on
    /// unless `SWITCHYARD_CUDA_SAMPLING=0`); off, such steps copy the logits to the host.
    pub fn set_device_sampling(&self, on: bool) {
        self.sampling_on.set(on);
    }

    /// Samples rows of host logits (rounded to bf16, as the model's logits are) with the
    /// device kernel, for checks: `logits` holds one row per entry of `rows`, or a single
    /// row of `cols` values that every entry samples from.
    pub fn sample_host_logits(
        &self,
        logits: &[f32],
        cols: usize,
        rows: &[RowSampling],
    ) -> Result<Vec<u32>, CudaError> {
        let shared = logits.len() == cols;
        if cols == 0 || (!shared && logits.len() != cols * rows.len()) {
            return Err(CudaError::Device(format!(
                "sample_host_logits: {} logits for {} rows of {cols}",
                logits.len(),
                rows.len()
            )));
        }
        let bits: Vec<u16> = logits
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_bits())
            .collect();
        let buf = self
            .stream
            .clone_htod(&bits)
            .map_err(|e| CudaError::Device(format!("sample_host_logits: {e:?}")))?;
        let x = CudaAct {
            rows: if shared { 1 } else { rows.len() },
            cols,
            buf: ActBuf::Own(buf),
        };
        let stride = if shared { 0 } else { cols };
        let ids = self.sample_rows_strided(&x, stride, rows);
        self.synchronize()?;
        Ok(ids)
    }

    /// Whether decode steps run as CUDA graphs.
    pub fn cuda_graphs(&self) -> bool {
        self.graphs_on.get()
    }

    /// The batch buckets that have a recorded decode graph, ascending.
    pub fn cuda_graph_buckets(&self) -> Vec<usize> {
        let mut b: Vec<usize> = self.graphs.borrow().keys().copied().collect();
        b.sort_unstable();
        b
    }

    /// The device's name, driver version and memory, for logs and benchmark records.
    pub fn describe(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "?".into());
        let mut drv_ver = 0;
        // SAFETY: plain out-parameter.
        unsafe { drv::cuDriverGetVersion(&mut drv_ver) };
        let total = self.ctx.total_mem().unwrap_or(0);
        format!(
            "{name}, CUDA driver API {}.{}, {:.1} GiB, {} SMs",
            drv_ver / 1000,
            (drv_ver % 1000) / 10,
            total as f64 / (1u64 << 30) as f64,
            self.num_sms
        )
    }

    /// Waits for all queued work (benchmarks time whole steps with it).
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream
            .synchronize()
            .map_err(|e| CudaError::Device(format!("synchronize: {e:?}")))
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        // Event tracking is off, so the guard has nothing to record.
        let (p, _guard) = s.device_ptr(&self.stream);
        p
    }

    fn launch(&self, f: &CudaFunction, grid: (u32, u32, u32), block: u32, args: &[A], what: &str) {
        let mut slots: Vec<u64> = args.iter().map(|a| a.slot()).collect();
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        // SAFETY: every kernel's parameter list is matched by its caller below; pointers
        // come from live buffers sized by the same code.
        let r = unsafe {
            cudarc::driver::result::launch_kernel(
                f.cu_function(),
                grid,
                (block, 1, 1),
                0,
                self.stream.cu_stream(),
                &mut params,
            )
        };
        check(r, what);
    }

    fn alloc_raw_u16(&self, n: usize) -> CudaSlice<u16> {
        // SAFETY: every kernel writes what it later reads; no buffer is read uninitialised.
        check(unsafe { self.stream.alloc::<u16>(n.max(1)) }, "alloc")
    }

    /// An activation buffer: from the recording's arena while a decode graph is recorded
    /// (so the captured kernels see addresses that stay valid), else a fresh one.
    fn alloc_u16(&self, n: usize) -> ActBuf {
        if let Some(rec) = self.rec.borrow_mut().as_mut() {
            return rec.arena_buf(n, |n| self.alloc_raw_u16(n), |b| self.ptr(b));
        }
        ActBuf::Own(self.alloc_raw_u16(n))
    }

    fn act_ptr(&self, a: &CudaAct) -> u64 {
        match &a.buf {
            ActBuf::Own(b) => self.ptr(b),
            ActBuf::Arena { ptr, .. } => *ptr,
        }
    }

    fn reshape(&self, a: &mut CudaAct, rows: usize, cols: usize) {
        if rows * cols > a.buf.len() {
            a.buf = self.alloc_u16(rows * cols);
        }
        a.rows = rows;
        a.cols = cols;
    }

    fn meta_ptr(&self, step: &CudaStep, off: usize) -> u64 {
        step.meta + 4 * off as u64
    }

    fn norm_block(cols: usize) -> u32 {
        ((cols / 8).div_ceil(32) * 32).clamp(32, 1024) as u32
    }

    fn upload_bf16(
        &self,
        parts: &[HostTensor<'_>],
        total: usize,
    ) -> Result<CudaSlice<u16>, ModelError> {
        let mut buf = self.alloc_raw_u16(total);
        let mut at = 0;
        for p in parts {
            let n = p.numel();
            let host: Vec<u16> = match p.dtype {
                DType::Bf16 => p.to_u16(),
                DType::F32 | DType::F16 => p
                    .to_f32()
                    .into_iter()
                    .map(|x| half::bf16::from_f32(x).to_bits())
                    .collect(),
            };
            self.stream
                .memcpy_htod(&host, &mut buf.slice_mut(at..at + n))
                .map_err(|e| CudaError::Device(format!("uploading {}: {e:?}", p.name)))?;
            at += n;
        }
        Ok(buf)
    }

    /// Runs `batch`-ordered GEMM `out[rows, w.rows] = x[rows, w.cols] · wᵀ`.
    fn gemm(&self, x: &CudaAct, w: &CudaWeight, out: &CudaAct) {
        let (m, n, k) = (w.rows as i32, x.rows as i32, w.cols as i32);
        let (alpha, beta) = (1.0f32, 0.0f32);
        // Row-major Y = X·Wᵀ is column-major Yᵀ = W·Xᵀ, with W's rows as columns (op T).
        // SAFETY: the three buffers hold at least m·k, k·n and m·n bf16 values.
        let r = unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                &alpha as *const f32 as *const c_void,
                self.ptr(&w.buf) as *const c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k,
                self.act_ptr(x) as *const c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k,
                &beta as *const f32 as *const c_void,
                self.act_ptr(out) as *mut c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                m,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        check(r, "cublasGemmEx");
    }

    /// `out[rows, w.rows] = x[rows, w.cols] · wᵀ` for `x.rows <= GEMV_MAX_ROWS`: each warp
    /// streams the weight rows of its 1–4 output columns once (see `gemv_body` in the kernels).
    fn gemv(&self, x: &CudaAct, w: &CudaWeight, out: &CudaAct) {
        debug_assert!((1..=GEMV_MAX_ROWS).contains(&x.rows) && w.cols.is_multiple_of(8));
        self.launch(
            &self.k.gemv[x.rows - 1],
            (grid(w.rows, GEMV_WARPS * gemv_cols_per_warp(x.rows)), 1, 1),
            (GEMV_WARPS * 32) as u32,
            &[
                A::P(self.act_ptr(x)),
                A::P(self.ptr(&w.buf)),
                A::P(self.act_ptr(out)),
                A::I(w.rows as i32),
                A::I(w.cols as i32),
            ],
            "gemv",
        );
    }

    fn use_gemv(&self, rows: usize, cols: usize) -> bool {
        self.gemv_on.get() && rows <= GEMV_MAX_ROWS && cols.is_multiple_of(8)
    }

    /// Checks and times the skinny-GEMM kernel against cuBLAS on fresh random bf16 inputs
    /// `x[m, k]`, `w[n, k]` (for `cuda_check`). Relative errors are measured against an f64
    /// host reference over up to 512 sampled output columns; times are medians of event-timed
    /// runs, rotating over enough weight copies that the L2 cache does not hold them.
    pub fn gemv_check(
        &self,
        m: usize,
        n: usize,
        k: usize,
        seed: u64,
    ) -> Result<GemvReport, CudaError> {
        if !(1..=GEMV_MAX_ROWS).contains(&m) || !k.is_multiple_of(8) || n == 0 {
            return Err(CudaError::Device(format!(
                "gemv_check: bad shape {m}x{n}x{k}"
            )));
        }
        let dev = |e: cudarc::driver::DriverError| CudaError::Device(format!("gemv_check: {e:?}"));
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut rnd = |len: usize| -> Vec<u16> {
            (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let u = (state >> 11) as f64 / (1u64 << 53) as f64;
                    half::bf16::from_f64(2.0 * u - 1.0).to_bits()
                })
                .collect()
        };
        let hx = rnd(m * k);
        let hw = rnd(n * k);
        let w_bytes = n * k * 2;
        let copies = (256usize << 20).div_ceil(w_bytes).clamp(1, 16);
        let mut ws = Vec::with_capacity(copies);
        for _ in 0..copies {
            ws.push(CudaWeight {
                rows: n,
                cols: k,
                buf: self.stream.clone_htod(&hw).map_err(dev)?,
            });
        }
        let x = CudaAct {
            rows: m,
            cols: k,
            buf: ActBuf::Own(self.stream.clone_htod(&hx).map_err(dev)?),
        };
        // Outputs poisoned with 0xffff (a bf16 NaN): an unwritten element fails the check.
        let poison = vec![0xffffu16; m * n];
        let out = || -> Result<CudaAct, CudaError> {
            Ok(CudaAct {
                rows: m,
                cols: n,
                buf: ActBuf::Own(self.stream.clone_htod(&poison).map_err(dev)?),
            })
        };
        let out_g = out()?;
        let out_c = out()?;
        self.gemv(&x, &ws[0], &out_g);
        self.gemm(&x, &ws[0], &out_c);
        let read = |a: &CudaAct| -> Result<Vec<f64>, CudaError> {
            let ActBuf::Own(b) = &a.buf else {
                unreachable!("own buffers above")
            };
            let v = self.stream.clone_dtoh(b).map_err(dev)?;
            Ok(v[..m * n]
                .iter()
                .map(|&u| half::bf16::from_bits(u).to_f64())
                .collect())
        };
        let g = read(&out_g)?;
        let c = read(&out_c)?;
        let xf: Vec<f64> = hx
            .iter()
            .map(|&u| half::bf16::from_bits(u).to_f64())
            .collect();
        let step = n.div_ceil(512).max(1);
        let (mut eg, mut ec, mut egc, mut rr, mut rc) = (0.0f64, 0.0, 0.0, 0.0, 0.0);
        for col in (0..n).step_by(step) {
            let wrow = &hw[col * k..(col + 1) * k];
            for r in 0..m {
                let xr = &xf[r * k..(r + 1) * k];
                let mut s = 0.0f64;
                for (a, &b) in xr.iter().zip(wrow) {
                    s += a * half::bf16::from_bits(b).to_f64();
                }
                let (gv, cv) = (g[r * n + col], c[r * n + col]);
                eg += (gv - s) * (gv - s);
                ec += (cv - s) * (cv - s);
                egc += (gv - cv) * (gv - cv);
                rr += s * s;
                rc += cv * cv;
            }
        }
        let all_written = g.iter().all(|v| v.is_finite());
        let time = |f: &dyn Fn(&CudaWeight)| -> Result<f64, CudaError> {
            let reps = 20 * copies;
            for wgt in &ws {
                f(wgt);
            }
            let mut t = Vec::new();
            for _ in 0..7 {
                let ev = Some(drv::CUevent_flags::CU_EVENT_DEFAULT);
                let a = self.stream.record_event(ev).map_err(dev)?;
                for i in 0..reps {
                    f(&ws[i % copies]);
                }
                let b = self.stream.record_event(ev).map_err(dev)?;
                b.synchronize().map_err(dev)?;
                t.push(a.elapsed_ms(&b).map_err(dev)? as f64 * 1e3 / reps as f64);
            }
            t.sort_by(|a, b| a.total_cmp(b));
            Ok(t[t.len() / 2])
        };
        let gemv_us = time(&|wgt| self.gemv(&x, wgt, &out_g))?;
        let cublas_us = time(&|wgt| self.gemm(&x, wgt, &out_c))?;
        Ok(GemvReport {
            rel_err_gemv: (eg / rr).sqrt(),
            rel_err_cublas: (ec / rr).sqrt(),
            rel_diff_gemv_cublas: (egc / rc.max(f64::MIN_POSITIVE)).sqrt(),
            all_written,
            gemv_us,
            cublas_us,
            weight_bytes: w_bytes,
        })
    }

    fn partials(&self, acc: usize, ml: usize) -> (u64, u64) {
        let grow = |p: &mut Option<(CudaSlice<f32>, CudaSlice<f32>)>| {
            let fits = matches!(&*p, Some((a, m)) if a.len() >= acc && m.len() >= ml);
            if !fits {
                // SAFETY: written by decode_attn before decode_reduce reads them.
                let a = check(unsafe { self.stream.alloc::<f32>(acc.max(1)) }, "alloc");
                let m = check(unsafe { self.stream.alloc::<f32>(ml.max(1)) }, "alloc");
                *p = Some((a, m));
            }
            let (a, m) = p.as_ref().expect("set above");
            (self.ptr(a), self.ptr(m))
        };
        // A recorded graph keeps partials of its own: the shared ones may be regrown later.
        if let Some(r) = self.rec.borrow_mut().as_mut() {
            return r.partials(acc, ml, grow);
        }
        grow(&mut self.partials.borrow_mut())
    }
    /// The step's metadata (one u32 array, see [`CudaStep`]) and its offsets into it; the
    /// caller puts the array on the device and sets `meta`.
    fn build_step(&self, batch: &ForwardBatch, rope_inv_freq: &[f32]) -> (Vec<u32>, CudaStep) {
        let t = batch.num_tokens();
        let mut meta: Vec<u32> = Vec::with_capacity(4 * t + 64);
        let put = |meta: &mut Vec<u32>, xs: &[u32]| {
            let at = meta.len();
            meta.extend_from_slice(xs);
            at
        };
        let token_ids = put(&mut meta, &batch.token_ids);
        let positions = put(&mut meta, &batch.positions);
        let slots = put(&mut meta, &batch.slots);
        let logit_rows = put(&mut meta, &batch.logit_rows);
        let inv_bits: Vec<u32> = rope_inv_freq.iter().map(|f| f.to_bits()).collect();
        let inv_freq = put(&mut meta, &inv_bits);

        let mut bts = Vec::new();
        let mut bt_off = Vec::with_capacity(batch.seqs.len());
        for s in &batch.seqs {
            bt_off.push(bts.len() as u32);
            bts.extend_from_slice(&s.block_table);
        }
        let mut dec = Vec::new();
        let mut pre = Vec::new();
        let mut tiles = Vec::new();
        let mut max_ctx = 0;
        for (s, off) in batch.seqs.iter().zip(&bt_off) {
            if s.q_len == 1 {
                dec.extend_from_slice(&[s.q_start as u32, 1, s.ctx_len as u32, *off]);
                max_ctx = max_ctx.max(s.ctx_len);
            } else if s.q_len > 1 {
                let i = (pre.len() / 4) as u32;
                pre.extend_from_slice(&[s.q_start as u32, s.q_len as u32, s.ctx_len as u32, *off]);
                for q0 in (0..s.q_len).step_by(PREFILL_TILE) {
                    tiles.extend_from_slice(&[i, q0 as u32]);
                }
            }
        }
        let n_dec = dec.len() / 4;
        // Split long contexts so that small batches still fill the GPU: aim for about four
        // blocks per SM counting 8 kv heads, in partitions of at least 32 tokens.
        let want_splits = self.want_splits(n_dec);
        let dec_part = max_ctx.div_ceil(want_splits).div_ceil(32).max(1) * 32;
        let dec_max_splits = max_ctx.div_ceil(dec_part).max(1);
        // Block-table offsets are relative to where the tables land in `meta`.
        let bt_base = meta.len() as u32;
        for chunk in dec.chunks_exact_mut(4).chain(pre.chunks_exact_mut(4)) {
            chunk[3] += bt_base;
        }
        put(&mut meta, &bts);
        let dec_info = put(&mut meta, &dec);
        let pre_info = put(&mut meta, &pre);
        let tiles_at = put(&mut meta, &tiles);
        // Offsets are taken relative to the meta pointer in the kernels, except block tables,
        // which the attention kernels index from `meta` itself (bt_base above).
        let step = CudaStep {
            meta: 0,
            _own: None,
            n_tokens: t,
            n_logit_rows: batch.logit_rows.len(),
            token_ids,
            positions,
            slots,
            logit_rows,
            inv_freq,
            dec_info,
            n_dec,
            dec_part,
            dec_max_splits,
            pre_info,
            tiles: tiles_at,
            n_tiles: tiles.len() / 2,
        };
        (meta, step)
    }

    /// Decode context splits for `n_dec` sequences: about four blocks per SM counting 8 kv
    /// heads.
    fn want_splits(&self, n_dec: usize) -> usize {
        (4 * self.num_sms).div_ceil(8 * n_dec.max(1)).max(1)
    }
}

/// Keeps freed stream-ordered allocations in the device's pool instead of returning them to
/// the driver at each synchronisation, so per-step activation buffers cost no cudaMalloc.
fn keep_pool_memory(ctx: &Arc<CudaContext>) -> Result<(), CudaError> {
    let mut pool: drv::CUmemoryPool = std::ptr::null_mut();
    let mut threshold: u64 = u64::MAX;
    // SAFETY: out-parameter, then an attribute write on the pool just returned.
    unsafe {
        let r = drv::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device());
        if r != drv::CUresult::CUDA_SUCCESS {
            // Devices without memory pools fall back to synchronous allocation in cudarc.
            return Ok(());
        }
        let r = drv::cuMemPoolSetAttribute(
            pool,
            drv::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut c_void,
        );
        if r != drv::CUresult::CUDA_SUCCESS {
            return Err(CudaError::Device(format!(
                "setting the memory pool threshold: {r:?}"
            )));
        }
    }
    Ok(())
}

impl Backend for CudaBackend {
    type Weight = CudaWeight;
    type Vector = CudaVector;
    type Act = CudaAct;
    type KvCache = CudaKvCache;
    type Step = CudaStep;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn upload_matrix(&self, parts: &[HostTensor<'_>]) -> Result<CudaWeight, ModelError> {
        let (rows, cols) = crate::backend::fused_shape(parts)?;
        let first = &parts[0];
        if cols % 8 != 0 {
            return Err(ModelError::Backend(format!(
                "tensor {:?}: {cols} columns; the CUDA kernels need a multiple of 8",
                first.name
            )));
        }
        let buf = self.upload_bf16(parts, rows * cols)?;
        Ok(CudaWeight { rows, cols, buf })
    }

    fn upload_vector(&self, parts: &[HostTensor<'_>]) -> Result<CudaVector, ModelError> {
        let host: Vec<f32> = parts.iter().flat_map(|p| p.to_f32()).collect();
        let buf = self
            .stream
            .clone_htod(&host)
            .map_err(|e| CudaError::Device(format!("uploading a vector: {e:?}")))?;
        Ok(CudaVector {
            len: host.len(),
            buf,
        })
    }

    fn all_reduce(&self, x: &mut CudaAct) {
        if self.nccl.is_none() && self.car.is_none() {
            return;
        }
        self.all_reduce_raw(self.act_ptr(x), x.rows * x.cols);
    }

    fn all_gather_cols(&self, local: &CudaAct, out: &mut CudaAct) {
        let (rows, c) = (local.rows, local.cols);
        let cols = out.cols;
        self.reshape(out, rows, cols);
        if rows == 0 || cols == 0 {
            return;
        }
        let own = self
            .car
            .as_ref()
            .filter(|_| self.nccl.is_none() || self.ar_choice.get() == AllReduceImpl::Own);
        if let Some(car) = own {
            self.meet_before_waiting();
            self.custom_all_gather(car, self.act_ptr(local), rows, c, self.act_ptr(out), cols);
            return;
        }
        let gathered;
        let (src, world) = match &self.nccl {
            Some(comm) => {
                gathered = self.alloc(self.world * rows, c);
                // SAFETY: `local` holds rows * c bf16 values and `gathered` world times as
                // many, both on this device; the call is ordered on this backend's stream.
                let r = unsafe {
                    cudarc::nccl::result::all_gather(
                        self.act_ptr(local) as *const c_void,
                        self.act_ptr(&gathered) as *mut c_void,
                        rows * c,
                        cudarc::nccl::sys::ncclDataType_t::ncclBfloat16,
                        comm.0,
                        self.stream.cu_stream() as _,
                    )
                };
                if let Err(e) = r {
                    panic!("NCCL all-gather failed: {e:?}");
                }
                (&gathered, self.world)
            }
            // Outside a group: this rank's block is every column there is.
            None => (local, 1),
        };
        let vec = i32::from(c.is_multiple_of(8) && cols.is_multiple_of(8));
        let units = rows * cols / if vec == 1 { 8 } else { 1 };
        self.launch(
            &self.k.interleave_cols,
            (units.div_ceil(256).clamp(1, 4 * self.num_sms) as u32, 1, 1),
            256,
            &[
                A::P(self.act_ptr(src)),
                A::I(rows as i32),
                A::I(c as i32),
                A::I(world as i32),
                A::P(self.act_ptr(out)),
                A::I(cols as i32),
                A::I(vec),
            ],
            "interleave_cols",
        );
    }

    // The peers of a failed rank wait on the GPU, in NCCL's kernels or ours, where the
    // host cannot release them safely: aborting an NCCL communicator frees it under the
    // thread still using it, and our kernel has no abort flag yet. So a group of more
    // than one cannot; the caller then stops the process rather than hang.
    fn abort_group(&self) -> bool {
        self.world <= 1
    }

    fn kv_cache_budget(&self) -> Result<Option<usize>, ModelError> {
        let (free, total) = self
            .ctx
            .mem_get_info()
            .map_err(|e| CudaError::Device(format!("cuMemGetInfo: {e:?}")))?;
        let allowed = (total as f64 * self.opts.gpu_memory_utilization as f64) as usize;
        let used = total - free;
        let budget = allowed.saturating_sub(used + ACTIVATION_RESERVE);
        if budget == 0 {
            return Err(ModelError::Backend(format!(
                "gpu_memory_utilization {} allows {:.1} GiB, but {:.1} GiB is already in use \
                 (weights and other processes) and {:.1} GiB is kept for activations: \
                 nothing is left for the KV cache",
                self.opts.gpu_memory_utilization,
                allowed as f64 / (1u64 << 30) as f64,
                used as f64 / (1u64 << 30) as f64,
                ACTIVATION_RESERVE as f64 / (1u64 << 30) as f64
            )));
        }
        Ok(Some(budget))
    }

    fn kv_elem_bytes(&self) -> usize {
        2
    }

    fn alloc_kv_cache(&self, spec: &KvCacheSpec) -> Result<CudaKvCache, ModelError> {
        if !HEAD_DIMS.contains(&spec.head_dim) {
            return Err(ModelError::Backend(format!(
                "head_dim {} is not supported by the CUDA attention kernels ({HEAD_DIMS:?})",
                spec.head_dim
            )));
        }
        let layer_elems = spec.num_blocks * spec.num_kv_heads * spec.block_size * spec.head_dim;
        let n = spec.num_layers * layer_elems;
        let alloc = || {
            // SAFETY: a slot is written by write_kv before attention reads it (the
            // scheduler never hands attention a position it has not computed).
            unsafe { self.stream.alloc::<u16>(n.max(1)) }.map_err(|e| {
                CudaError::Device(format!(
                    "allocating {:.1} GiB of KV cache: {e:?}",
                    (2 * n) as f64 / (1u64 << 30) as f64
                ))
            })
        };
        Ok(CudaKvCache {
            spec: *spec,
            layer_elems,
            k: alloc()?,
            v: alloc()?,
        })
    }

    fn prepare_step(&self, batch: &ForwardBatch, rope_inv_freq: &[f32]) -> CudaStep {
        let (meta, mut step) = self.build_step(batch, rope_inv_freq);
        if let Some(rec) = self.rec.borrow_mut().as_mut() {
            // A decode graph being recorded: fixed split count, each sequence's partition
            // derived on the device from its length, metadata in the graph's own buffer.
            step.dec_part = 0;
            step.dec_max_splits = self.want_splits(step.n_dec);
            step.meta = rec.meta(
                &meta,
                rope_inv_freq,
                |m| check(self.stream.clone_htod(m), "uploading step metadata"),
                |b| self.ptr(b),
            );
            return step;
        }
        let dev = check(self.stream.clone_htod(&meta), "uploading step metadata");
        step.meta = self.ptr(&dev);
        step._own = Some(dev);
        step
    }

    fn greedy_graph_step(
        &self,
        batch: &ForwardBatch,
        forward: &mut dyn FnMut(&Self, &ForwardBatch) -> CudaAct,
    ) -> Option<Vec<u32>> {
        self.graph_step(batch, forward)
    }

    fn alloc(&self, rows: usize, cols: usize) -> CudaAct {
        CudaAct {
            rows,
            cols,
            buf: self.alloc_u16(rows * cols),
        }
    }

    fn embed(&self, table: &CudaWeight, step: &CudaStep, out: &mut CudaAct) {
        self.reshape(out, step.n_tokens, table.cols);
        if step.n_tokens == 0 {
            return;
        }
        self.launch(
            &self.k.embed,
            (step.n_tokens as u32, 1, 1),
            128,
            &[
                A::P(self.ptr(&table.buf)),
                A::P(self.meta_ptr(step, step.token_ids)),
                A::P(self.act_ptr(out)),
                A::I(table.cols as i32),
            ],
            "embed",
        );
    }

    fn matmul(&self, x: &CudaAct, w: &CudaWeight, bias: Option<&CudaVector>, out: &mut CudaAct) {
        debug_assert_eq!(x.cols, w.cols);
        self.reshape(out, x.rows, w.rows);
        if x.rows == 0 {
            return;
        }
        if self.use_gemv(x.rows, w.cols) {
            self.gemv(x, w, out);
        } else {
            self.gemm(x, w, out);
        }
        if let Some(b) = bias {
            debug_assert_eq!(b.len, w.rows);
            self.launch(
                &self.k.add_bias,
                (x.rows as u32, 1, 1),
                256,
                &[
                    A::P(self.act_ptr(out)),
                    A::P(self.ptr(&b.buf)),
                    A::I(w.rows as i32),
                ],
                "add_bias",
            );
        }
    }

    fn rms_norm(&self, x: &CudaAct, w: &CudaVector, eps: f32, out: &mut CudaAct) {
        self.reshape(out, x.rows, x.cols);
        if x.rows == 0 {
            return;
        }
        self.launch(
            &self.k.rms_norm,
            (x.rows as u32, 1, 1),
            Self::norm_block(x.cols),
            &[
                A::P(self.act_ptr(x)),
                A::P(self.ptr(&w.buf)),
                A::P(self.act_ptr(out)),
                A::I(x.cols as i32),
                A::F(eps),
            ],
            "rms_norm",
        );
    }

    fn add_rms_norm(
        &self,
        residual: &mut CudaAct,
        delta: &CudaAct,
        w: &CudaVector,
        eps: f32,
        out: &mut CudaAct,
    ) {
        self.reshape(out, residual.rows, residual.cols);
        if residual.rows == 0 {
            return;
        }
        self.launch(
            &self.k.add_rms_norm,
            (residual.rows as u32, 1, 1),
            Self::norm_block(residual.cols),
            &[
                A::P(self.act_ptr(residual)),
                A::P(self.act_ptr(delta)),
                A::P(self.ptr(&w.buf)),
                A::P(self.act_ptr(out)),
                A::I(residual.cols as i32),
                A::F(eps),
            ],
            "add_rms_norm",
        );
    }

    fn add_assign(&self, residual: &mut CudaAct, delta: &CudaAct) {
        let n8 = residual.rows * residual.cols / 8;
        if n8 == 0 {
            return;
        }
        self.launch(
            &self.k.add_assign,
            (grid(n8, 256), 1, 1),
            256,
            &[
                A::P(self.act_ptr(residual)),
                A::P(self.act_ptr(delta)),
                A::L(n8 as i64),
            ],
            "add_assign",
        );
    }

    fn qk_norm_rope(
        &self,
        qkv: &mut CudaAct,
        layout: &AttnLayout,
        qk_norm: Option<QkNorm<'_, CudaVector>>,
        step: &CudaStep,
    ) {
        if qkv.rows == 0 {
            return;
        }
        let heads = layout.num_heads + layout.num_kv_heads;
        let (qw, kw, eps) = match &qk_norm {
            Some(n) => (self.ptr(&n.q.buf), self.ptr(&n.k.buf), n.eps),
            None => (0, 0, 0.0),
        };
        self.launch(
            &self.k.qk_norm_rope,
            (qkv.rows as u32, grid(heads, 8), 1),
            256,
            &[
                A::P(self.act_ptr(qkv)),
                A::I(qkv.cols as i32),
                A::I(layout.num_heads as i32),
                A::I(layout.num_kv_heads as i32),
                A::I(layout.head_dim as i32),
                A::P(self.meta_ptr(step, step.positions)),
                A::P(self.meta_ptr(step, step.inv_freq)),
                A::P(qw),
                A::P(kw),
                A::F(eps),
            ],
            "qk_norm_rope",
        );
    }

    fn write_kv(
        &self,
        cache: &mut CudaKvCache,
        layer: usize,
        qkv: &CudaAct,
        layout: &AttnLayout,
        step: &CudaStep,
    ) {
        if qkv.rows == 0 {
            return;
        }
        let off = 2 * (layer * cache.layer_elems) as u64;
        let vecs = layout.kv_size() / 8;
        self.launch(
            &self.k.write_kv,
            (qkv.rows as u32, 1, 1),
            (vecs.div_ceil(32) * 32).clamp(32, 256) as u32,
            &[
                A::P(self.act_ptr(qkv)),
                A::I(qkv.cols as i32),
                A::I(layout.q_size() as i32),
                A::I(layout.num_kv_heads as i32),
                A::I(layout.head_dim as i32),
                A::P(self.meta_ptr(step, step.slots)),
                A::P(self.ptr(&cache.k) + off),
                A::P(self.ptr(&cache.v) + off),
                A::I(cache.spec.block_size as i32),
            ],
            "write_kv",
        );
    }

    fn attention(
        &self,
        cache: &CudaKvCache,
        layer: usize,
        qkv: &CudaAct,
        layout: &AttnLayout,
        step: &CudaStep,
        out: &mut CudaAct,
    ) {
        self.reshape(out, qkv.rows, layout.q_size());
        let hd = layout.head_dim;
        let group = layout.num_heads / layout.num_kv_heads;
        let hi = HEAD_DIMS
            .iter()
            .position(|&d| d == hd)
            .unwrap_or_else(|| panic!("head_dim {hd} unsupported (checked at cache allocation)"));
        let off = 2 * (layer * cache.layer_elems) as u64;
        let (kc, vc) = (self.ptr(&cache.k) + off, self.ptr(&cache.v) + off);
        let meta = step.meta;
        let scale = 1.0 / (hd as f32).sqrt();
        let bs = cache.spec.block_size as i32;
        if step.n_dec > 0 {
            let gi = GROUPS.iter().position(|&g| g == group).unwrap_or_else(|| {
                panic!("{group} query heads per kv head: the CUDA decode kernel takes 1, 2, 4 or 8")
            });
            let splits = step.dec_max_splits;
            let rows = step.n_dec * layout.num_heads * splits;
            let (pa, pml) = if splits > 1 {
                self.partials(rows * hd, 2 * rows)
            } else {
                (0, 0)
            };
            self.launch(
                &self.k.decode_attn[hi][gi],
                (step.n_dec as u32, layout.num_kv_heads as u32, splits as u32),
                128,
                &[
                    A::P(self.act_ptr(qkv)),
                    A::I(qkv.cols as i32),
                    A::P(self.act_ptr(out)),
                    A::I(out.cols as i32),
                    A::P(kc),
                    A::P(vc),
                    A::P(self.meta_ptr(step, step.dec_info)),
                    A::P(meta),
                    A::I(layout.num_kv_heads as i32),
                    A::I(bs),
                    A::F(scale),
                    A::I(step.dec_part as i32),
                    A::P(pa),
                    A::P(pml),
                    A::I(splits as i32),
                ],
                "decode_attn",
            );
            if splits > 1 {
                self.launch(
                    &self.k.decode_reduce,
                    (step.n_dec as u32, layout.num_heads as u32, 1),
                    128,
                    &[
                        A::P(self.act_ptr(out)),
                        A::I(out.cols as i32),
                        A::P(self.meta_ptr(step, step.dec_info)),
                        A::I(layout.num_heads as i32),
                        A::I(hd as i32),
                        A::I(step.dec_part as i32),
                        A::P(pa),
                        A::P(pml),
                        A::I(splits as i32),
                    ],
                    "decode_reduce",
                );
            }
        }
        if step.n_tiles > 0 {
            self.launch(
                &self.k.prefill_attn[hi],
                (step.n_tiles as u32, layout.num_heads as u32, 1),
                128,
                &[
                    A::P(self.act_ptr(qkv)),
                    A::I(qkv.cols as i32),
                    A::P(self.act_ptr(out)),
                    A::I(out.cols as i32),
                    A::P(kc),
                    A::P(vc),
                    A::P(self.meta_ptr(step, step.pre_info)),
                    A::P(self.meta_ptr(step, step.tiles)),
                    A::P(meta),
                    A::I(layout.num_heads as i32),
                    A::I(layout.num_kv_heads as i32),
                    A::I(bs),
                    A::F(scale * std::f32::consts::LOG2_E),
                ],
                "prefill_attn",
            );
        }
    }

    fn silu_mul(&self, gate_up: &CudaAct, out: &mut CudaAct) {
        let inter = gate_up.cols / 2;
        self.reshape(out, gate_up.rows, inter);
        if gate_up.rows == 0 {
            return;
        }
        self.launch(
            &self.k.silu_mul,
            (grid(inter / 8, 256), gate_up.rows as u32, 1),
            256,
            &[
                A::P(self.act_ptr(gate_up)),
                A::P(self.act_ptr(out)),
                A::I(inter as i32),
            ],
            "silu_mul",
        );
    }

    fn gather_logit_rows(&self, x: &CudaAct, step: &CudaStep, out: &mut CudaAct) {
        self.reshape(out, step.n_logit_rows, x.cols);
        if step.n_logit_rows == 0 {
            return;
        }
        self.launch(
            &self.k.gather_rows,
            (step.n_logit_rows as u32, 1, 1),
            128,
            &[
                A::P(self.act_ptr(x)),
                A::P(self.meta_ptr(step, step.logit_rows)),
                A::P(self.act_ptr(out)),
                A::I(x.cols as i32),
            ],
            "gather_rows",
        );
    }

    fn to_host(&self, x: &CudaAct) -> Vec<f32> {
        let n = x.rows * x.cols;
        if n == 0 {
            return Vec::new();
        }
        // Widen on the device: the host then copies plain f32 with no per-value work.
        // SAFETY: fully written by bf16_to_f32 below.
        let wide = check(unsafe { self.stream.alloc::<f32>(n) }, "alloc");
        self.launch(
            &self.k.bf16_to_f32,
            (grid(n, 256), 1, 1),
            256,
            &[A::P(self.act_ptr(x)), A::P(self.ptr(&wide)), A::L(n as i64)],
            "bf16_to_f32",
        );
        check(self.stream.clone_dtoh(&wide), "copying logits to the host")
    }

    fn argmax_rows(&self, x: &CudaAct) -> Option<Vec<u32>> {
        if x.rows == 0 {
            return Some(Vec::new());
        }
        // SAFETY: one index per row, all written below.
        let idx = check(unsafe { self.stream.alloc::<u32>(x.rows) }, "alloc");
        self.argmax_into(x, self.ptr(&idx));
        Some(check(
            self.stream.clone_dtoh(&idx),
            "copying sampled tokens",
        ))
    }

    fn has_device_argmax(&self) -> bool {
        true
    }

    fn has_device_sampling(&self) -> bool {
        self.sampling_on.get()
    }

    fn sample_rows(&self, x: &CudaAct, rows: &[RowSampling]) -> Option<Vec<u32>> {
        assert_eq!(
            x.rows,
            rows.len(),
            "sample_rows: one RowSampling per logit row"
        );
        Some(self.sample_rows_strided(x, x.cols, rows))
    }
}

impl CudaBackend {
    /// [`Backend::sample_rows`] over `rows.len()` rows starting `stride` values apart in
    /// `x` (0: all rows read `x`'s first row).
    fn sample_rows_strided(&self, x: &CudaAct, stride: usize, rows: &[RowSampling]) -> Vec<u32> {
        if rows.is_empty() {
            return Vec::new();
        }
        let params: Vec<u32> = rows
            .iter()
            .flat_map(|r| {
                [
                    r.temperature.to_bits(),
                    r.top_p.to_bits(),
                    r.min_p.to_bits(),
                    r.uniform.to_bits(),
                    r.top_k,
                ]
            })
            .collect();
        let params = check(self.stream.clone_htod(&params), "uploading sampling params");
        // SAFETY: one id per row, all written by the kernel.
        let idx = check(unsafe { self.stream.alloc::<u32>(rows.len()) }, "alloc");
        self.launch(
            &self.k.sample_rows,
            (rows.len() as u32, 1, 1),
            1024,
            &[
                A::P(self.act_ptr(x)),
                A::I(x.cols as i32),
                A::L(stride as i64),
                A::P(self.ptr(&params)),
                A::P(self.ptr(&idx)),
            ],
            "sample_rows",
        );
        check(self.stream.clone_dtoh(&idx), "copying sampled tokens")
    }
}
