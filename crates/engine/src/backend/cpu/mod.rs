//! The CPU backend: f32 activations and KV cache, f32/bf16/f16 weights, paged attention
//! that reads K/V through block tables. It is the correctness reference for other
//! backends and the engine CI runs.

mod attention;
pub mod kernels;
mod simd;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use kernels::{Matrix, WeightData};

use super::{AttnLayout, Backend, ForwardBatch, KvCacheSpec, QkNorm, SeqSlice};
use crate::model::{DType, HostTensor, ModelError};

/// Row-major f32 activations.
#[derive(Clone, Debug, Default)]
pub struct CpuAct {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl CpuAct {
    fn reshape(&mut self, rows: usize, cols: usize) {
        self.rows = rows;
        self.cols = cols;
        self.data.resize(rows * cols, 0.0);
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

impl Drop for CpuAct {
    fn drop(&mut self) {
        recycle::give(std::mem::take(&mut self.data));
    }
}

/// Activation buffers of finished steps, reused by later steps on the same thread. A long
/// prefill step's buffers are tens of MB; allocated afresh, every step paid the kernel's
/// page faults for them (≈3% of a prefill's time on Zen 4).
mod recycle {
    use std::cell::RefCell;

    /// At most this many buffers, and this many bytes, are kept per thread.
    const MAX_BUFFERS: usize = 16;
    const MAX_BYTES: usize = 512 << 20;

    thread_local! {
        static FREE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    }

    /// `len` zeros, in the smallest kept buffer that holds them if there is one.
    pub(super) fn take(len: usize) -> Vec<f32> {
        let kept = FREE
            .try_with(|f| {
                let mut f = f.borrow_mut();
                let best = (0..f.len())
                    .filter(|&i| f[i].capacity() >= len)
                    .min_by_key(|&i| f[i].capacity())?;
                Some(f.swap_remove(best))
            })
            .ok()
            .flatten();
        match kept {
            Some(mut v) => {
                v.clear();
                v.resize(len, 0.0);
                v
            }
            None => vec![0.0; len],
        }
    }

    /// Keeps `v` for a later `take` if the limits allow, else frees it.
    pub(super) fn give(v: Vec<f32>) {
        if v.capacity() == 0 {
            return;
        }
        // During thread teardown the list may already be gone; `v` is then just freed.
        let _ = FREE.try_with(|f| {
            let mut f = f.borrow_mut();
            let bytes: usize = f.iter().map(|b| 4 * b.capacity()).sum();
            if f.len() < MAX_BUFFERS && bytes + 4 * v.capacity() <= MAX_BYTES {
                f.push(v);
            }
        });
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_recycled_buffer_comes_back_zeroed_and_is_reused() {
            let mut old = vec![7.0f32; 100];
            old.truncate(80);
            let ptr = old.as_ptr();
            give(old);
            let v = take(50);
            assert_eq!(v.as_ptr(), ptr, "the kept buffer is reused");
            assert_eq!(v, vec![0.0; 50]);
            // Too large for anything kept: a fresh buffer.
            assert_eq!(take(1000), vec![0.0; 1000]);
        }

        #[test]
        fn the_kept_set_is_bounded() {
            for _ in 0..2 * MAX_BUFFERS {
                give(vec![1.0; 4]);
            }
            let kept = FREE.with(|f| f.borrow().len());
            assert_eq!(kept, MAX_BUFFERS);
            give(vec![0.0; MAX_BYTES / 4 + 1]);
            assert_eq!(FREE.with(|f| f.borrow().len()), MAX_BUFFERS);
        }
    }
}

/// One layer's K or V values.
pub(crate) enum KvData {
    F32(Vec<f32>),
    /// bf16 bit patterns: half the memory traffic of f32 in decode attention.
    Bf16(Vec<u16>),
}

impl KvData {
    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            KvData::F32(d) => d[at..at + src.len()].copy_from_slice(src),
            KvData::Bf16(d) => {
                for (o, &x) in d[at..at + src.len()].iter_mut().zip(src) {
                    *o = half::bf16::from_f32(x).to_bits();
                }
            }
        }
    }
}

/// Paged KV cache: per layer, K and V as `[block][kv_head][offset][head_dim]`, so one
/// head's keys within a block are contiguous. Values are f32 when the weights are f32 (the
/// reference path the golden tests hold to transformers) and bf16 when the weights are half
/// precision, where f32 would only add memory traffic.
pub struct CpuKvCache {
    spec: KvCacheSpec,
    k: Vec<KvData>,
    v: Vec<KvData>,
}

impl CpuKvCache {
    fn index(&self, slot: usize, kv_head: usize) -> usize {
        let s = &self.spec;
        let (block, off) = (slot / s.block_size, slot % s.block_size);
        ((block * s.num_kv_heads + kv_head) * s.block_size + off) * s.head_dim
    }
}

pub struct CpuStep {
    positions: Vec<u32>,
    slots: Vec<u32>,
    seqs: Vec<SeqSlice>,
    logit_rows: Vec<u32>,
    token_ids: Vec<u32>,
    /// `[token][head_dim / 2]` rotary tables.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// Work below this many rows runs on the calling thread: waking the pool costs more.
const PAR_ROWS: usize = 16;

#[derive(Debug, Default)]
pub struct CpuBackend {
    /// Set when any uploaded weight matrix is bf16 or f16; the KV cache then uses bf16.
    half_weights: AtomicBool,
    /// This backend's rank and its group, when it is one shard of a tensor-parallel model.
    comm: Option<(usize, Arc<CpuComm>)>,
}

/// An in-process all-reduce for tensor-parallel emulation on the CPU: each rank (one
/// thread) deposits its partial sums, then every rank adds all deposits in rank order, so
/// every rank ends with bit-identical results.
///
/// A rank that fails mid-step never arrives; [`CpuComm::abort`] then releases the ranks
/// waiting for it, and every all-reduce of the group panics from then on.
#[derive(Debug)]
pub struct CpuComm {
    world: usize,
    /// (ranks arrived at the current rendezvous, rendezvous completed so far, aborted).
    meet: Mutex<(usize, u64, bool)>,
    met: Condvar,
    slots: Vec<Mutex<Vec<f32>>>,
}

/// What a rank's all-reduce panics with once its group was aborted.
pub const GROUP_ABORTED: &str = "tensor-parallel group aborted: another rank failed";

impl CpuComm {
    pub fn new(world: usize) -> Arc<Self> {
        Arc::new(CpuComm {
            world,
            meet: Mutex::new((0, 0, false)),
            met: Condvar::new(),
            slots: (0..world).map(|_| Mutex::new(Vec::new())).collect(),
        })
    }

    /// Releases every rank waiting in an all-reduce and fails every later one.
    pub fn abort(&self) {
        let mut meet = self.meet.lock().unwrap_or_else(|e| e.into_inner());
        meet.2 = true;
        self.met.notify_all();
    }

    pub fn is_aborted(&self) -> bool {
        self.meet.lock().unwrap_or_else(|e| e.into_inner()).2
    }

    /// Waits until every rank has arrived (a barrier); panics if the group is aborted
    /// before or while waiting.
    fn rendezvous(&self) {
        let mut meet = self.meet.lock().unwrap_or_else(|e| e.into_inner());
        if meet.2 {
            panic!("{GROUP_ABORTED}");
        }
        let round = meet.1;
        meet.0 += 1;
        if meet.0 == self.world {
            meet.0 = 0;
            meet.1 += 1;
            self.met.notify_all();
            return;
        }
        while meet.1 == round && !meet.2 {
            meet = self.met.wait(meet).unwrap_or_else(|e| e.into_inner());
        }
        if meet.1 == round {
            panic!("{GROUP_ABORTED}");
        }
    }

    /// Every rank's `[rows, c]` block side by side in `out` (`[rows, cols]`), rank order,
    /// columns past `cols` dropped.
    fn all_gather_cols(&self, rank: usize, local: &[f32], c: usize, out: &mut [f32], cols: usize) {
        {
            let mut slot = self.slots[rank].lock().unwrap_or_else(|e| e.into_inner());
            slot.clear();
            slot.extend_from_slice(local);
        }
        self.rendezvous();
        for q in 0..self.world {
            let slot = self.slots[q].lock().unwrap_or_else(|e| e.into_inner());
            gather_block(&slot, c, q, out, cols);
        }
        self.rendezvous();
    }

    fn all_reduce(&self, rank: usize, x: &mut [f32]) {
        {
            let mut slot = self.slots[rank].lock().unwrap_or_else(|e| e.into_inner());
            slot.clear();
            slot.extend_from_slice(x);
        }
        self.rendezvous();
        x.fill(0.0);
        for r in 0..self.world {
            let slot = self.slots[r].lock().unwrap_or_else(|e| e.into_inner());
            for (a, b) in x.iter_mut().zip(slot.iter()) {
                *a += b;
            }
        }
        // Nobody may overwrite a slot before every rank has read it.
        self.rendezvous();
    }
}

/// Copies rank `q`'s `[rows, c]` block into columns `q * c ..` of `out` (`[rows, cols]`),
/// dropping those past `cols`.
fn gather_block(block: &[f32], c: usize, q: usize, out: &mut [f32], cols: usize) {
    let start = (q * c).min(cols);
    let n = (start + c).min(cols) - start;
    if c == 0 || n == 0 {
        return;
    }
    for (src, dst) in block.chunks_exact(c).zip(out.chunks_exact_mut(cols)) {
        dst[start..start + n].copy_from_slice(&src[..n]);
    }
}

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend::default()
    }

    /// Rank `rank` of the tensor-parallel group `comm`.
    pub fn with_comm(rank: usize, comm: Arc<CpuComm>) -> Self {
        CpuBackend {
            comm: Some((rank, comm)),
            ..CpuBackend::default()
        }
    }

    fn kv_bf16(&self) -> bool {
        self.half_weights.load(Ordering::Relaxed)
    }
}

/// Lets pool tasks write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: each task writes a region no other task touches, and the pool joins all tasks
// before the buffer's borrow ends.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// SAFETY: the caller guarantees `[offset, offset + len)` is in bounds and written by
    /// this task alone.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, offset: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(offset), len)
    }
}

/// Runs `f(row, row_slice)` over the rows of `data`, in parallel when there are many.
fn for_each_row(data: &mut [f32], cols: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = data.len().checked_div(cols).unwrap_or(0);
    if rows < PAR_ROWS {
        for (r, row) in data.chunks_exact_mut(cols).enumerate() {
            f(r, row);
        }
        return;
    }
    let ptr = SharedMut(data.as_mut_ptr());
    kernels::parallel_for(rows, |r| {
        // SAFETY: row r is written by task r only.
        let row = unsafe { ptr.slice(r * cols, cols) };
        f(r, row);
    });
}

fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss = kernels::dot(x, x);
    let scale = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = wi * (xi * scale);
    }
}

fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let ss = kernels::dot(x, x);
    let scale = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for (xi, &wi) in x.iter_mut().zip(w) {
        *xi = wi * (*xi * scale);
    }
}

fn silu_mul_row(g: &[f32], u: &[f32], out: &mut [f32]) {
    #[inline(always)]
    fn body<const FMA: bool>(g: &[f32], u: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + simd::exp::<FMA>(-g)) * u;
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(g: &[f32], u: &[f32], out: &mut [f32]) {
        body::<true>(g, u, out)
    }
    /// The same loop, vectorised 16 lanes wide (same results: each element is computed
    /// alone).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw")]
    unsafe fn avx512(g: &[f32], u: &[f32], out: &mut [f32]) {
        body::<true>(g, u, out)
    }
    #[cfg(target_arch = "x86_64")]
    if kernels::has_avx512_bf16() {
        // SAFETY: the CPU supports AVX-512 (F, BW, BF16) and AVX2 + FMA.
        unsafe { avx512(g, u, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if kernels::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA.
        unsafe { avx2(g, u, out) };
        return;
    }
    body::<false>(g, u, out)
}

/// Rotates pairs `(i, i + d/2)` (the Hugging Face "rotate_half" convention).
fn rope_head(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    let (a, b) = x.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x2 * cos[i] + x1 * sin[i];
    }
}

fn concat_u16(parts: &[HostTensor<'_>]) -> Vec<u16> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.numel()).sum());
    for p in parts {
        out.extend(
            p.bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]])),
        );
    }
    out
}

impl Backend for CpuBackend {
    type Weight = Matrix;
    type Vector = Vec<f32>;
    type Act = CpuAct;
    type KvCache = CpuKvCache;
    type Step = CpuStep;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn upload_matrix(&self, parts: &[HostTensor<'_>]) -> Result<Matrix, ModelError> {
        let (rows, cols) = super::fused_shape(parts)?;
        let first = &parts[0];
        if first.dtype != DType::F32 {
            self.half_weights.store(true, Ordering::Relaxed);
        }
        Ok(match first.dtype {
            DType::F32 => {
                let mut data = Vec::with_capacity(rows * cols);
                for p in parts {
                    data.extend(p.to_f32());
                }
                Matrix::from_f32(rows, cols, data)
            }
            DType::Bf16 => Matrix::from_bf16_bits(rows, cols, concat_u16(parts)),
            DType::F16 => Matrix::from_f16_bits(rows, cols, concat_u16(parts)),
        })
    }

    /// On AVX-512 BF16 CPUs, bf16 projections are packed for the matmul at load and kept
    /// only in that layout (half the memory, no packing stall on the first request).
    fn upload_linear(&self, parts: &[HostTensor<'_>]) -> Result<Matrix, ModelError> {
        let mut m = self.upload_matrix(parts)?;
        m.keep_packed_only();
        Ok(m)
    }

    fn upload_vector(&self, parts: &[HostTensor<'_>]) -> Result<Vec<f32>, ModelError> {
        Ok(parts.iter().flat_map(|p| p.to_f32()).collect())
    }

    fn alloc_kv_cache(&self, spec: &KvCacheSpec) -> Result<CpuKvCache, ModelError> {
        let per_layer = spec.num_blocks * spec.block_size * spec.num_kv_heads * spec.head_dim;
        let bf16 = self.kv_bf16();
        let too_big = || {
            ModelError::Backend(format!(
                "cannot allocate {} MiB of KV cache",
                (spec.num_layers * per_layer * 2 * self.kv_elem_bytes()) >> 20
            ))
        };
        let alloc = || -> Result<KvData, ModelError> {
            Ok(if bf16 {
                let mut v = Vec::new();
                v.try_reserve_exact(per_layer).map_err(|_| too_big())?;
                v.resize(per_layer, 0u16);
                KvData::Bf16(v)
            } else {
                let mut v = Vec::new();
                v.try_reserve_exact(per_layer).map_err(|_| too_big())?;
                v.resize(per_layer, 0f32);
                KvData::F32(v)
            })
        };
        let mut k = Vec::with_capacity(spec.num_layers);
        let mut v = Vec::with_capacity(spec.num_layers);
        for _ in 0..spec.num_layers {
            k.push(alloc()?);
            v.push(alloc()?);
        }
        Ok(CpuKvCache { spec: *spec, k, v })
    }

    fn kv_elem_bytes(&self) -> usize {
        if self.kv_bf16() {
            2
        } else {
            4
        }
    }

    fn prepare_step(&self, batch: &ForwardBatch, rope_inv_freq: &[f32]) -> CpuStep {
        let half = rope_inv_freq.len();
        let mut cos = Vec::with_capacity(batch.positions.len() * half);
        let mut sin = Vec::with_capacity(batch.positions.len() * half);
        for &p in &batch.positions {
            for &f in rope_inv_freq {
                // The angle is rounded to f32 first, as the reference implementation does.
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        CpuStep {
            positions: batch.positions.clone(),
            slots: batch.slots.clone(),
            seqs: batch.seqs.clone(),
            logit_rows: batch.logit_rows.clone(),
            token_ids: batch.token_ids.clone(),
            cos,
            sin,
        }
    }

    fn alloc(&self, rows: usize, cols: usize) -> CpuAct {
        CpuAct {
            rows,
            cols,
            data: recycle::take(rows * cols),
        }
    }

    fn embed(&self, table: &Matrix, step: &CpuStep, out: &mut CpuAct) {
        out.reshape(step.token_ids.len(), table.cols);
        for (row, &id) in out.data.chunks_exact_mut(table.cols).zip(&step.token_ids) {
            // The scheduler validates ids against the vocabulary before they get here.
            table.row_f32(id as usize, row);
        }
    }

    fn matmul(&self, x: &CpuAct, w: &Matrix, bias: Option<&Vec<f32>>, out: &mut CpuAct) {
        debug_assert_eq!(x.cols, w.cols);
        out.reshape(x.rows, w.rows);
        kernels::matmul(&x.data, x.rows, w, bias.map(|b| &b[..]), &mut out.data);
    }

    fn rms_norm(&self, x: &CpuAct, w: &Vec<f32>, eps: f32, out: &mut CpuAct) {
        out.reshape(x.rows, x.cols);
        let cols = x.cols;
        for_each_row(&mut out.data, cols, |r, o| {
            rms_norm_row(&x.data[r * cols..(r + 1) * cols], w, eps, o)
        });
    }

    fn add_rms_norm(
        &self,
        residual: &mut CpuAct,
        delta: &CpuAct,
        w: &Vec<f32>,
        eps: f32,
        out: &mut CpuAct,
    ) {
        out.reshape(residual.rows, residual.cols);
        let cols = residual.cols;
        let optr = SharedMut(out.data.as_mut_ptr());
        for_each_row(&mut residual.data, cols, |r, res| {
            for (a, &d) in res.iter_mut().zip(&delta.data[r * cols..(r + 1) * cols]) {
                *a += d;
            }
            // SAFETY: row r of `out` is written by this task alone.
            let o = unsafe { optr.slice(r * cols, cols) };
            rms_norm_row(res, w, eps, o);
        });
    }

    fn add_assign(&self, residual: &mut CpuAct, delta: &CpuAct) {
        for (a, &d) in residual.data.iter_mut().zip(&delta.data) {
            *a += d;
        }
    }

    fn qk_norm_rope(
        &self,
        qkv: &mut CpuAct,
        layout: &AttnLayout,
        qk_norm: Option<QkNorm<'_, Vec<f32>>>,
        step: &CpuStep,
    ) {
        let hd = layout.head_dim;
        let half = hd / 2;
        let nq = layout.num_heads;
        let nk = layout.num_kv_heads;
        let cols = qkv.cols;
        for_each_row(&mut qkv.data, cols, |t, row| {
            let cos = &step.cos[t * half..(t + 1) * half];
            let sin = &step.sin[t * half..(t + 1) * half];
            for h in 0..nq + nk {
                let head = &mut row[h * hd..(h + 1) * hd];
                if let Some(n) = &qk_norm {
                    let w = if h < nq { n.q } else { n.k };
                    rms_norm_in_place(head, w, n.eps);
                }
                rope_head(head, cos, sin);
            }
        });
    }

    fn write_kv(
        &self,
        cache: &mut CpuKvCache,
        layer: usize,
        qkv: &CpuAct,
        layout: &AttnLayout,
        step: &CpuStep,
    ) {
        let hd = layout.head_dim;
        let k_off = layout.q_size();
        let v_off = k_off + layout.kv_size();
        for (t, &slot) in step.slots.iter().enumerate() {
            let row = qkv.row(t);
            for h in 0..layout.num_kv_heads {
                let at = cache.index(slot as usize, h);
                cache.k[layer].write(at, &row[k_off + h * hd..][..hd]);
                cache.v[layer].write(at, &row[v_off + h * hd..][..hd]);
            }
        }
    }

    fn attention(
        &self,
        cache: &CpuKvCache,
        layer: usize,
        qkv: &CpuAct,
        layout: &AttnLayout,
        step: &CpuStep,
        out: &mut CpuAct,
    ) {
        out.reshape(qkv.rows, layout.q_size());
        let out_cols = out.cols;
        let args = attention::AttnArgs {
            seqs: &step.seqs,
            qkv: &qkv.data,
            qkv_cols: qkv.cols,
            k_cache: &cache.k[layer],
            v_cache: &cache.v[layer],
            block_size: cache.spec.block_size,
            num_heads: layout.num_heads,
            num_kv_heads: layout.num_kv_heads,
            head_dim: layout.head_dim,
        };
        attention::attention(&args, &mut out.data, out_cols);
    }

    fn silu_mul(&self, gate_up: &CpuAct, out: &mut CpuAct) {
        let inter = gate_up.cols / 2;
        out.reshape(gate_up.rows, inter);
        for_each_row(&mut out.data, inter, |r, o| {
            let (g, u) = gate_up.row(r).split_at(inter);
            silu_mul_row(g, u, o);
        });
    }

    fn gather_logit_rows(&self, x: &CpuAct, step: &CpuStep, out: &mut CpuAct) {
        out.reshape(step.logit_rows.len(), x.cols);
        for (o, &r) in out.data.chunks_exact_mut(x.cols).zip(&step.logit_rows) {
            o.copy_from_slice(x.row(r as usize));
        }
    }

    fn to_host(&self, x: &CpuAct) -> Vec<f32> {
        x.data.clone()
    }

    fn all_reduce(&self, x: &mut CpuAct) {
        if let Some((rank, comm)) = &self.comm {
            comm.all_reduce(*rank, &mut x.data);
        }
    }

    fn all_gather_cols(&self, local: &CpuAct, out: &mut CpuAct) {
        debug_assert_eq!(local.rows, out.rows);
        match &self.comm {
            Some((rank, comm)) => {
                comm.all_gather_cols(*rank, &local.data, local.cols, &mut out.data, out.cols)
            }
            None => gather_block(&local.data, local.cols, 0, &mut out.data, out.cols),
        }
    }

    fn abort_group(&self) -> bool {
        if let Some((_, comm)) = &self.comm {
            comm.abort();
        }
        true
    }
}

impl CpuStep {
    pub fn positions(&self) -> &[u32] {
        &self.positions
    }
}

/// The weight storage dtype of a matrix, for reporting.
pub fn matrix_dtype(m: &Matrix) -> DType {
    match m.data {
        WeightData::F32(_) => DType::F32,
        WeightData::Bf16(_) => DType::Bf16,
        WeightData::F16(_) => DType::F16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn act(rows: usize, cols: usize, data: &[f32]) -> CpuAct {
        CpuAct {
            rows,
            cols,
            data: data.to_vec(),
        }
    }

    /// Two ranks' column blocks side by side on both, the last rank's padding dropped.
    #[test]
    fn all_gather_cols_joins_rank_blocks_and_drops_padding() {
        let comm = CpuComm::new(2);
        let blocks = [
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            vec![7.0, 8.0, 0.0, 9.0, 10.0, 0.0],
        ];
        let outs: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    let b = CpuBackend::with_comm(rank, comm.clone());
                    let local = act(2, 3, &blocks[rank]);
                    s.spawn(move || {
                        let mut out = act(2, 5, &[0.0; 10]);
                        b.all_gather_cols(&local, &mut out);
                        out.data.clone()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want = vec![1.0, 2.0, 3.0, 7.0, 8.0, 4.0, 5.0, 6.0, 9.0, 10.0];
        assert_eq!(outs, vec![want.clone(), want]);

        // Outside a group the block is cut to the output's width.
        let alone = CpuBackend::new();
        let mut out = act(2, 2, &[0.0; 4]);
        alone.all_gather_cols(&act(2, 3, &blocks[0]), &mut out);
        assert_eq!(out.data, vec![1.0, 2.0, 4.0, 5.0]);
    }
}
