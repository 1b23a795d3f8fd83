//! CUDA graphs for pure decode steps. A decode step of a small batch is mostly host launch
//! overhead (≈13 launches per layer); recorded once as a graph, it replays with one launch.
//!
//! A graph is recorded per batch *bucket* (1, 2, 4, …, 256 sequences; a batch runs in the
//! smallest bucket that holds it, padded): the model's own forward runs twice over the
//! padded batch, first eagerly while every activation buffer, the decode partials and the
//! step metadata are allocated in the recording's arena (fixed addresses; this also warms
//! cuBLAS up for the shapes), then under stream capture, taking the same buffers in the same
//! order. The greedy argmax is captured with it. Each later step only copies its metadata
//! (token ids, positions, slots, block tables padded to the graph's width, context lengths)
//! into the graph's fixed buffer and replays: the kernels read every per-step quantity from
//! device memory, and the decode-attention split is derived on the device from each
//! sequence's length (`part == 0` in the kernels), so no kernel argument changes.
//!
//! Padding rows have `ctx_len` 0 and slot `u32::MAX`: they write no KV and their attention
//! output is zero. Prefill and mixed steps, batches over the largest bucket and non-greedy
//! steps run eagerly. A batch whose block table outgrows the graph's width records the
//! bucket again at twice the width.

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;

use super::{check, ActBuf, CudaAct, CudaBackend, CudaSlice, A};
use crate::backend::{ForwardBatch, SeqSlice};

/// Batch sizes that get a graph; a batch runs in the smallest one that holds it.
pub(super) const BUCKETS: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

/// Smallest block-table width (blocks per sequence) a graph is recorded with.
const MIN_WIDTH: usize = 64;

type Partials = Option<(CudaSlice<f32>, CudaSlice<f32>)>;

/// The buffers of a graph being recorded (see the module docs).
pub(super) struct Recording {
    /// False during the eager sizing run, true during the capture.
    capturing: bool,
    arena: Vec<CudaSlice<u16>>,
    next: usize,
    partials: Partials,
    meta: Option<CudaSlice<u32>>,
    meta_len: usize,
    inv_freq: Vec<f32>,
}

impl Recording {
    /// The next activation buffer of `n` values: a new arena slot while sizing, the same
    /// slot again while capturing.
    pub(super) fn arena_buf(
        &mut self,
        n: usize,
        alloc: impl FnOnce(usize) -> CudaSlice<u16>,
        ptr: impl Fn(&CudaSlice<u16>) -> u64,
    ) -> ActBuf {
        if self.capturing {
            let b = self
                .arena
                .get(self.next)
                .filter(|b| b.len() >= n)
                .unwrap_or_else(|| {
                    panic!(
                        "decode graph capture: allocation {} ({n} values) differs from the \
                         sizing run",
                        self.next
                    )
                });
            self.next += 1;
            return ActBuf::Arena {
                ptr: ptr(b),
                len: b.len(),
            };
        }
        let b = alloc(n);
        let out = ActBuf::Arena {
            ptr: ptr(&b),
            len: b.len(),
        };
        self.arena.push(b);
        out
    }

    /// The decode partials (same sizes in both runs, so the capture allocates nothing).
    pub(super) fn partials(
        &mut self,
        acc: usize,
        ml: usize,
        grow: impl FnOnce(&mut Partials) -> (u64, u64),
    ) -> (u64, u64) {
        debug_assert!(
            !self.capturing
                || matches!(&self.partials, Some((a, m)) if a.len() >= acc && m.len() >= ml)
        );
        grow(&mut self.partials)
    }

    /// Device address of the step metadata: uploaded while sizing, reused while capturing.
    pub(super) fn meta(
        &mut self,
        host: &[u32],
        inv_freq: &[f32],
        upload: impl FnOnce(&[u32]) -> CudaSlice<u32>,
        ptr: impl Fn(&CudaSlice<u32>) -> u64,
    ) -> u64 {
        if self.meta.is_none() {
            self.meta = Some(upload(host));
            self.meta_len = host.len();
            self.inv_freq = inv_freq.to_vec();
        }
        assert_eq!(
            self.meta_len,
            host.len(),
            "decode graph: step metadata layout changed between sizing and capture"
        );
        ptr(self.meta.as_ref().expect("set above"))
    }
}

/// `CudaGraph` holds raw driver handles; the backend (and so its graphs) is used from one
/// thread at a time (it is `Send`, not `Sync`: every graph sits behind a `RefCell`).
struct SendGraph(CudaGraph);
// SAFETY: see above; a graph is never touched from two threads at once.
unsafe impl Send for SendGraph {}

/// A recorded decode step of one bucket and the fixed buffers its kernels use.
pub(super) struct DecodeGraph {
    graph: SendGraph,
    /// Block-table entries per sequence in the metadata layout.
    width: usize,
    meta: CudaSlice<u32>,
    inv_freq: Vec<f32>,
    ids: CudaSlice<u32>,
    _arena: Vec<CudaSlice<u16>>,
    _partials: Partials,
}

/// Whether `batch` is a pure decode step whose every row samples (graph-able).
fn is_decode(batch: &ForwardBatch) -> bool {
    let n = batch.seqs.len();
    n > 0
        && batch.num_tokens() == n
        && batch.logit_rows.len() == n
        && batch
            .seqs
            .iter()
            .enumerate()
            .all(|(i, s)| s.q_len == 1 && s.q_start == i && s.ctx_len > 0)
        && batch
            .logit_rows
            .iter()
            .enumerate()
            .all(|(i, &r)| r as usize == i)
}

/// `batch` padded to `bucket` sequences with block tables of exactly `width` entries, so
/// that its metadata layout depends on the bucket and width alone.
fn pad(batch: &ForwardBatch, bucket: usize, width: usize) -> ForwardBatch {
    let n = batch.seqs.len();
    let extend = |v: &[u32], fill: u32| {
        let mut out = Vec::with_capacity(bucket);
        out.extend_from_slice(v);
        out.resize(bucket, fill);
        out
    };
    let seqs = (0..bucket)
        .map(|i| {
            let mut block_table = Vec::with_capacity(width);
            let ctx_len = match batch.seqs.get(i) {
                Some(s) => {
                    block_table.extend_from_slice(&s.block_table);
                    s.ctx_len
                }
                None => 0,
            };
            block_table.resize(width, 0);
            SeqSlice {
                q_start: i,
                q_len: 1,
                ctx_len,
                block_table,
            }
        })
        .collect();
    debug_assert!(n <= bucket);
    ForwardBatch {
        token_ids: extend(&batch.token_ids, 0),
        positions: extend(&batch.positions, 0),
        slots: extend(&batch.slots, u32::MAX),
        seqs,
        logit_rows: (0..bucket as u32).collect(),
        block_size: batch.block_size,
    }
}

impl CudaBackend {
    /// Runs a greedy decode step through its bucket's graph, recording it first if needed.
    /// `None`: the step is not graph-able (or graphs are off) and runs eagerly.
    pub(super) fn graph_step(
        &self,
        batch: &ForwardBatch,
        forward: &mut dyn FnMut(&Self, &ForwardBatch) -> CudaAct,
    ) -> Option<Vec<u32>> {
        if !self.graphs_on.get() || !is_decode(batch) {
            return None;
        }
        let n = batch.seqs.len();
        let bucket = *BUCKETS.iter().find(|&&b| b >= n)?;
        let need = batch
            .seqs
            .iter()
            .map(|s| s.block_table.len())
            .max()
            .unwrap_or(0);
        let have = self.graphs.borrow().get(&bucket).map(|g| g.width);
        let width = match have {
            Some(w) if w >= need => w,
            _ => need.next_power_of_two().max(MIN_WIDTH),
        };
        let padded = pad(batch, bucket, width);
        if have != Some(width) {
            self.graphs.borrow_mut().remove(&bucket);
            match self.record(bucket, width, &padded, forward) {
                Ok(g) => {
                    self.graphs.borrow_mut().insert(bucket, g);
                }
                Err(e) => {
                    // The sizing run wrote only what the eager step writes again.
                    eprintln!(
                        "switchyard: recording the batch-{bucket} decode graph failed ({e}); \
                         CUDA graphs are off"
                    );
                    self.set_cuda_graphs(false);
                    return None;
                }
            }
        }
        let mut graphs = self.graphs.borrow_mut();
        let g = graphs.get_mut(&bucket).expect("recorded above");
        let (meta, _) = self.build_step(&padded, &g.inv_freq);
        check(
            self.stream.memcpy_htod(&meta, &mut g.meta),
            "uploading graph step metadata",
        );
        self.meet_before_waiting();
        check(g.graph.0.launch(), "cuGraphLaunch");
        let mut ids = check(self.stream.clone_dtoh(&g.ids), "copying sampled tokens");
        ids.truncate(n);
        Some(ids)
    }

    fn record(
        &self,
        bucket: usize,
        width: usize,
        padded: &ForwardBatch,
        forward: &mut dyn FnMut(&Self, &ForwardBatch) -> CudaAct,
    ) -> Result<DecodeGraph, String> {
        // SAFETY: written by the argmax kernel before it is read.
        let ids = check(unsafe { self.stream.alloc::<u32>(bucket) }, "alloc");
        let ids_ptr = self.ptr(&ids);
        *self.rec.borrow_mut() = Some(Recording {
            capturing: false,
            arena: Vec::new(),
            next: 0,
            partials: None,
            meta: None,
            meta_len: 0,
            inv_freq: Vec::new(),
        });
        // Sizing run: allocates the arena, runs (and so warms up) every kernel.
        let logits = forward(self, padded);
        self.argmax_into(&logits, ids_ptr);
        drop(logits);
        if let Some(r) = self.rec.borrow_mut().as_mut() {
            r.capturing = true;
            r.next = 0;
        }
        let captured = self
            .stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| format!("begin capture: {e:?}"))
            .and_then(|()| {
                let logits = forward(self, padded);
                self.argmax_into(&logits, ids_ptr);
                drop(logits);
                self.stream
                    .end_capture(CUgraphInstantiate_flags(0))
                    .map_err(|e| format!("end capture: {e:?}"))
            });
        let rec = self.rec.borrow_mut().take().expect("set above");
        let graph = captured?.ok_or("the capture recorded nothing")?;
        graph
            .upload()
            .map_err(|e| format!("uploading the graph: {e:?}"))?;
        Ok(DecodeGraph {
            graph: SendGraph(graph),
            width,
            meta: rec.meta.ok_or("no step metadata was prepared")?,
            inv_freq: rec.inv_freq,
            ids,
            _arena: rec.arena,
            _partials: rec.partials,
        })
    }

    /// Row argmax of `x` into `out` (one u32 per row), on the stream.
    pub(super) fn argmax_into(&self, x: &CudaAct, out: u64) {
        if x.rows == 0 {
            return;
        }
        self.launch(
            &self.k.argmax_rows,
            (x.rows as u32, 1, 1),
            1024,
            &[A::P(self.act_ptr(x)), A::I(x.cols as i32), A::P(out)],
            "argmax_rows",
        );
    }
}
