//! Compute backends. Each implements [`Backend`]; the model definition in
//! [`crate::model::Model`] is written once against it, so a new device adds a backend and
//! touches neither the model nor the scheduler.
//!
//! The trait is shaped for devices with their own memory: weights are uploaded once, the
//! per-step metadata (positions, KV slots, block tables, rotary tables) is prepared once per
//! step by [`Backend::prepare_step`], and activations stay on the device until
//! [`Backend::to_host`] returns the logits the sampler needs.

pub mod cpu;
// Without the `cuda` feature a stand-in with the same API compiles instead, whose
// constructor reports that CUDA support was not built, so callers need no `#[cfg]`.
#[cfg_attr(not(feature = "cuda"), path = "cuda/stub.rs")]
pub mod cuda;

use crate::model::{HostTensor, ModelError};

/// One sequence's share of a forward step.
#[derive(Clone, Debug, Default)]
pub struct SeqSlice {
    /// First row of this sequence's new tokens in the step's token rows.
    pub q_start: usize,
    /// Number of new tokens (1 for decode; a prompt chunk for prefill).
    pub q_len: usize,
    /// Tokens in the KV cache once this step has written its new ones.
    pub ctx_len: usize,
    /// Physical KV block of each logical block of the sequence.
    pub block_table: Vec<u32>,
}

/// Everything a forward step needs, in host memory, built by the scheduler's runner.
#[derive(Clone, Debug, Default)]
pub struct ForwardBatch {
    pub token_ids: Vec<u32>,
    pub positions: Vec<u32>,
    /// KV slot (block * block_size + offset) each new token writes.
    pub slots: Vec<u32>,
    pub seqs: Vec<SeqSlice>,
    /// Token rows whose logits are wanted (the last row of each sequence that samples).
    pub logit_rows: Vec<u32>,
    pub block_size: usize,
}

impl ForwardBatch {
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }
}

/// How one logit row samples on the device: the request's filters and one uniform draw
/// `u ∈ [0, 1)` taken on the host from the sequence's own generator (so seeds stay per
/// request). `temperature` below 1e-5 or `top_k == 1` picks the argmax.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowSampling {
    pub temperature: f32,
    /// 0 is off.
    pub top_k: u32,
    /// 1 is off.
    pub top_p: f32,
    /// 0 is off.
    pub min_p: f32,
    pub uniform: f32,
}

/// The host reference of [`Backend::sample_rows`] for one row: the same filters and the
/// same inverse CDF over token ids with `r.uniform` (sorting; for fallbacks and checks).
/// NaN logits are impossible, +inf ones the largest finite value; a row with no possible
/// token gives 0.
pub fn sample_row_host(row: &[f32], r: &RowSampling) -> u32 {
    let clean = |x: f32| {
        if x.is_nan() {
            f32::NEG_INFINITY
        } else {
            x.min(f32::MAX)
        }
    };
    let max = row
        .iter()
        .map(|&x| clean(x))
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return 0;
    }
    if r.temperature < 1e-5 || r.top_k == 1 {
        return row.iter().position(|&x| clean(x) == max).unwrap_or(0) as u32;
    }
    let probs = sample_row_weights(row, r);
    let total: f64 = probs.iter().map(|&w| w as f64).sum();
    let target = r.uniform as f64 * total;
    let mut acc = 0.0;
    let mut last = 0;
    for (i, &w) in probs.iter().enumerate() {
        if w > 0.0 {
            acc += w as f64;
            last = i;
            if acc > target {
                return i as u32;
            }
        }
    }
    last as u32
}

/// The unnormalised weights [`sample_row_host`] draws from (0 outside the kept set).
pub fn sample_row_weights(row: &[f32], r: &RowSampling) -> Vec<f32> {
    let clean = |x: f32| {
        if x.is_nan() {
            f32::NEG_INFINITY
        } else {
            x.min(f32::MAX)
        }
    };
    let x: Vec<f32> = row.iter().map(|&v| clean(v)).collect();
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sorted = x.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let k = r.top_k as usize;
    let kth = if k == 0 || k >= x.len() {
        f32::NEG_INFINITY
    } else {
        sorted[k - 1]
    };
    let inv_t = 1.0 / r.temperature;
    let mut w: Vec<f32> = x
        .iter()
        .map(|&v| {
            let w = if v == f32::NEG_INFINITY {
                0.0
            } else {
                ((v - max) * inv_t).exp()
            };
            if v >= kth && w >= r.min_p {
                w
            } else {
                0.0
            }
        })
        .collect();
    if r.top_p < 1.0 {
        // The nucleus: tokens whose more likely tokens weigh less than top_p of the total.
        let total: f64 = w.iter().map(|&v| v as f64).sum();
        let mut order: Vec<usize> = (0..w.len()).filter(|&i| w[i] > 0.0).collect();
        order.sort_by(|&a, &b| w[b].total_cmp(&w[a]));
        let cut = r.top_p as f64 * total;
        let (mut above, mut i) = (0.0, 0);
        let mut threshold = 0.0;
        while i < order.len() {
            let v = w[order[i]];
            if above >= cut {
                break;
            }
            threshold = v;
            while i < order.len() && w[order[i]] == v {
                above += v as f64;
                i += 1;
            }
        }
        for v in w.iter_mut() {
            if *v < threshold {
                *v = 0.0;
            }
        }
    }
    w
}

/// Geometry of the paged KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheSpec {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl KvCacheSpec {
    /// Bytes one token of KV occupies across all layers, at `elem` bytes per value.
    pub fn bytes_per_token(&self, elem: usize) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * elem
    }
}

/// Head geometry of the fused q|k|v projection output rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnLayout {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl AttnLayout {
    pub fn q_size(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_size(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    pub fn qkv_size(&self) -> usize {
        self.q_size() + 2 * self.kv_size()
    }
}

/// Shape `(rows, cols)` of `parts` fused along the output dimension, checking that they
/// are 2-D with equal column counts and one dtype (backends upload such fusions as one
/// matrix: q|k|v, gate|up).
pub fn fused_shape(parts: &[HostTensor<'_>]) -> Result<(usize, usize), ModelError> {
    let first = parts
        .first()
        .ok_or_else(|| ModelError::Backend("upload_matrix: no parts".into()))?;
    let cols = *first.shape.get(1).unwrap_or(&0);
    let mut rows = 0;
    for p in parts {
        if p.shape.len() != 2 || p.shape[1] != cols || p.dtype != first.dtype {
            return Err(ModelError::Backend(format!(
                "tensor {:?} ({:?} {:?}) cannot be fused with {:?} ({:?} {:?})",
                p.name, p.dtype, p.shape, first.name, first.dtype, first.shape
            )));
        }
        rows += p.shape[0];
    }
    Ok((rows, cols))
}

/// Per-head RMSNorm weights for q and k (Qwen3), applied before RoPE.
pub struct QkNorm<'a, V> {
    pub q: &'a V,
    pub k: &'a V,
    pub eps: f32,
}

/// The operations the decoder needs, on one device.
pub trait Backend: Send + 'static {
    /// A weight matrix `[out, in]`.
    type Weight: Send + Sync;
    /// A 1-D parameter (norm weight, bias).
    type Vector: Send + Sync;
    /// An activation buffer `[rows, cols]`.
    type Act: Send;
    type KvCache: Send;
    /// Per-step metadata in the device's own form.
    type Step;

    fn name(&self) -> &'static str;

    /// Uploads `parts` concatenated along the output dimension (fused q|k|v, gate|up).
    fn upload_matrix(&self, parts: &[HostTensor<'_>]) -> Result<Self::Weight, ModelError>;
    /// `upload_matrix` for a weight that is only ever an operand of `matmul`, never read
    /// by row (every projection; not the embedding table): the backend may keep it in its
    /// matmul layout alone.
    fn upload_linear(&self, parts: &[HostTensor<'_>]) -> Result<Self::Weight, ModelError> {
        self.upload_matrix(parts)
    }
    /// Uploads `parts` concatenated.
    fn upload_vector(&self, parts: &[HostTensor<'_>]) -> Result<Self::Vector, ModelError>;
    fn alloc_kv_cache(&self, spec: &KvCacheSpec) -> Result<Self::KvCache, ModelError>;
    fn prepare_step(&self, batch: &ForwardBatch, rope_inv_freq: &[f32]) -> Self::Step;
    fn alloc(&self, rows: usize, cols: usize) -> Self::Act;

    /// `out[t] = table[token_ids[t]]`.
    fn embed(&self, table: &Self::Weight, step: &Self::Step, out: &mut Self::Act);
    /// `out = x · wᵀ (+ bias)`; resizes `out` to `[x.rows, w.out]`.
    fn matmul(
        &self,
        x: &Self::Act,
        w: &Self::Weight,
        bias: Option<&Self::Vector>,
        out: &mut Self::Act,
    );
    fn rms_norm(&self, x: &Self::Act, w: &Self::Vector, eps: f32, out: &mut Self::Act);
    /// `residual += delta; out = rms_norm(residual)`.
    fn add_rms_norm(
        &self,
        residual: &mut Self::Act,
        delta: &Self::Act,
        w: &Self::Vector,
        eps: f32,
        out: &mut Self::Act,
    );
    fn add_assign(&self, residual: &mut Self::Act, delta: &Self::Act);
    /// On the q and k parts of fused qkv rows: optional per-head RMSNorm, then RoPE.
    fn qk_norm_rope(
        &self,
        qkv: &mut Self::Act,
        layout: &AttnLayout,
        qk_norm: Option<QkNorm<'_, Self::Vector>>,
        step: &Self::Step,
    );
    /// Writes each row's k and v into its KV slot of `layer`.
    fn write_kv(
        &self,
        cache: &mut Self::KvCache,
        layer: usize,
        qkv: &Self::Act,
        layout: &AttnLayout,
        step: &Self::Step,
    );
    /// Causal attention of each row's q over its sequence's cached keys and values.
    fn attention(
        &self,
        cache: &Self::KvCache,
        layer: usize,
        qkv: &Self::Act,
        layout: &AttnLayout,
        step: &Self::Step,
        out: &mut Self::Act,
    );
    /// `out = silu(gate) * up` for rows laid out `[gate | up]`.
    fn silu_mul(&self, gate_up: &Self::Act, out: &mut Self::Act);
    /// `out` = the step's logit rows of `x`.
    fn gather_logit_rows(&self, x: &Self::Act, step: &Self::Step, out: &mut Self::Act);
    fn to_host(&self, x: &Self::Act) -> Vec<f32>;

    /// Sums `x` across the tensor-parallel group, in place, on every rank (called after
    /// the attention output and MLP down projections). A backend outside any group leaves
    /// `x` as it is.
    fn all_reduce(&self, _x: &mut Self::Act) {}

    /// The vocabulary-parallel output layer's gather: rank `r` computed columns
    /// `r * c .. (r + 1) * c` of every row (`local`, `[rows, c]`); every rank receives all
    /// of them in `out` (`[rows, cols]`, `cols <= world * c`: columns past `cols`, the
    /// last rank's padding, are dropped). Outside any group, `out` is `local` cut to
    /// `cols` columns.
    fn all_gather_cols(&self, local: &Self::Act, out: &mut Self::Act);

    /// A rank of this backend's group failed mid-step and will not reach its next
    /// collective: release the ranks waiting in one (theirs fail or return garbage; the
    /// step is lost anyway) and fail every later collective of the group. Returns false
    /// when this backend cannot, in which case waiting for the other ranks would hang.
    /// A backend outside any group has nothing to release.
    fn abort_group(&self) -> bool {
        true
    }

    /// Bytes of device memory the KV cache may take, asked once the weights are loaded.
    /// `None` (host backends) leaves the size to the caller's `kv_cache_bytes`.
    fn kv_cache_budget(&self) -> Result<Option<usize>, ModelError> {
        Ok(None)
    }
    /// Bytes per cached K or V value (sizes the cache from a byte budget).
    fn kv_elem_bytes(&self) -> usize {
        4
    }
    /// Whether [`Backend::argmax_rows`] runs on the device, sparing the logits' copy to
    /// the host for greedy sampling.
    fn has_device_argmax(&self) -> bool {
        false
    }
    /// The index of each row's first maximum, computed where `x` lives; `None` if the
    /// backend has no such kernel.
    fn argmax_rows(&self, _x: &Self::Act) -> Option<Vec<u32>> {
        None
    }
    /// Whether [`Backend::sample_rows`] runs on the device.
    fn has_device_sampling(&self) -> bool {
        false
    }
    /// Samples one token per row of `logits` where they live (temperature, top-k, top-p,
    /// min-p, inverse CDF with each row's uniform) and returns the ids; `None` if the
    /// backend has no such kernel (the caller copies the logits out).
    fn sample_rows(&self, _logits: &Self::Act, _rows: &[RowSampling]) -> Option<Vec<u32>> {
        None
    }
    /// Runs a greedy step as a recorded device graph (CUDA graphs) and returns each logit
    /// row's argmax, recording the graph first when needed. `forward` runs the model over
    /// the batch it is given (the backend may pad `batch` to a fixed size) and returns its
    /// logits. `None`: nothing ran, and the caller runs the step eagerly.
    fn greedy_graph_step(
        &self,
        _batch: &ForwardBatch,
        _forward: &mut dyn FnMut(&Self, &ForwardBatch) -> Self::Act,
    ) -> Option<Vec<u32>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rs(temperature: f32, top_k: u32, top_p: f32, min_p: f32, uniform: f32) -> RowSampling {
        RowSampling {
            temperature,
            top_k,
            top_p,
            min_p,
            uniform,
        }
    }

    #[test]
    fn host_reference_greedy_is_the_first_maximum() {
        let row = [1.0, f32::NAN, 3.0, 3.0, f32::NEG_INFINITY];
        assert_eq!(sample_row_host(&row, &rs(0.0, 0, 1.0, 0.0, 0.7)), 2);
        assert_eq!(sample_row_host(&row, &rs(1.0, 1, 1.0, 0.0, 0.7)), 2);
        assert_eq!(
            sample_row_host(&[f32::NAN; 3], &rs(1.0, 0, 1.0, 0.0, 0.5)),
            0
        );
    }

    #[test]
    fn host_reference_filters_match_the_sampler_semantics() {
        let ln = |p: &[f32]| p.iter().map(|x| x.ln()).collect::<Vec<f32>>();
        let row = ln(&[0.15, 0.5, 0.05, 0.3]);
        // Nucleus 0.75: 0.5 and 0.3 (the tokens more likely than 0.15 weigh 0.8 ≥ 0.75).
        let w = sample_row_weights(&row, &rs(1.0, 0, 0.75, 0.0, 0.0));
        assert_eq!(
            w.iter().map(|&x| x > 0.0).collect::<Vec<_>>(),
            [false, true, false, true]
        );
        // top_k 2 with a tie at the cut keeps both tied tokens.
        let tied = [1.0, 2.0, 1.0, 0.0];
        let w = sample_row_weights(&tied, &rs(1.0, 2, 1.0, 0.0, 0.0));
        assert_eq!(
            w.iter().map(|&x| x > 0.0).collect::<Vec<_>>(),
            [true, true, true, false]
        );
        // min_p 0.4 of the top probability 0.5: keeps 0.5 and 0.3.
        let w = sample_row_weights(&row, &rs(1.0, 0, 1.0, 0.4, 0.0));
        assert_eq!(
            w.iter().map(|&x| x > 0.0).collect::<Vec<_>>(),
            [false, true, false, true]
        );
        // Inverse CDF over ids of the kept set: u = 0 the first, u → 1 the last.
        let p = rs(1.0, 0, 0.75, 0.0, 0.0);
        assert_eq!(sample_row_host(&row, &p), 1);
        assert_eq!(
            sample_row_host(
                &row,
                &RowSampling {
                    uniform: 0.999_999,
                    ..p
                }
            ),
            3
        );
        assert_eq!(sample_row_host(&row, &RowSampling { uniform: 0.6, ..p }), 1);
        assert_eq!(
            sample_row_host(&row, &RowSampling { uniform: 0.65, ..p }),
            3
        );
    }
}
