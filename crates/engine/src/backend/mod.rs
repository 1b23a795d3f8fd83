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
