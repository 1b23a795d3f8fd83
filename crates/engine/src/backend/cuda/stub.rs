//! Stand-in for the CUDA backend when the `cuda` feature is off: the same names, and a
//! constructor that says how to get the real one. Its types are uninhabited, so the
//! [`Backend`] methods below can never run.

use super::{AttnLayout, Backend, ForwardBatch, KvCacheSpec, QkNorm};
use crate::model::{HostTensor, ModelError};

/// Why the CUDA backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("CUDA is not available: {0}")]
    Unavailable(String),
    #[error("CUDA: {0}")]
    Device(String),
}

impl From<CudaError> for ModelError {
    fn from(e: CudaError) -> Self {
        ModelError::Backend(e.to_string())
    }
}

/// Which all-reduce the ranks of a group use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllReduceImpl {
    Auto,
    Nccl,
    Own,
}

#[derive(Clone, Debug)]
pub struct CudaOptions {
    pub device: usize,
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

#[derive(Debug)]
pub enum Never {}

pub struct CudaBackend(Never);

const NOT_BUILT: &str =
    "this binary was built without CUDA support (rebuild with `--features cuda`)";

pub fn probe_libraries() -> Result<(), CudaError> {
    Err(CudaError::Unavailable(NOT_BUILT.into()))
}

impl CudaBackend {
    pub fn new(_opts: CudaOptions) -> Result<Self, CudaError> {
        Err(CudaError::Unavailable(NOT_BUILT.into()))
    }
    pub fn tp_group(_opts: CudaOptions, _devices: &[usize]) -> Result<Vec<Self>, CudaError> {
        Err(CudaError::Unavailable(NOT_BUILT.into()))
    }
    pub fn nccl_group(_opts: CudaOptions, _devices: &[usize]) -> Result<Vec<Self>, CudaError> {
        Err(CudaError::Unavailable(NOT_BUILT.into()))
    }
    pub fn shared_device_group(
        _opts: CudaOptions,
        _device: usize,
        _world: usize,
    ) -> Result<Vec<Self>, CudaError> {
        Err(CudaError::Unavailable(NOT_BUILT.into()))
    }
    pub fn set_all_reduce(&self, _which: AllReduceImpl) {
        match self.0 {}
    }
    pub fn has_own_all_reduce(&self) -> bool {
        match self.0 {}
    }
    pub fn all_reduce_check(
        &self,
        _host: &[u16],
        _iters: usize,
    ) -> Result<(Vec<u16>, f64), CudaError> {
        match self.0 {}
    }
    pub fn describe(&self) -> String {
        match self.0 {}
    }
    pub fn synchronize(&self) -> Result<(), CudaError> {
        match self.0 {}
    }
    pub fn set_cuda_graphs(&self, _on: bool) {
        match self.0 {}
    }
    pub fn set_gemv(&self, _on: bool) {
        match self.0 {}
    }
    pub fn cuda_graphs(&self) -> bool {
        match self.0 {}
    }
    pub fn cuda_graph_buckets(&self) -> Vec<usize> {
        match self.0 {}
    }
    pub fn set_device_sampling(&self, _on: bool) {
        match self.0 {}
    }
    pub fn sample_host_logits(
        &self,
        _logits: &[f32],
        _cols: usize,
        _rows: &[super::RowSampling],
    ) -> Result<Vec<u32>, CudaError> {
        match self.0 {}
    }
}

impl Backend for CudaBackend {
    type Weight = Never;
    type Vector = Never;
    type Act = Never;
    type KvCache = Never;
    type Step = Never;

    fn name(&self) -> &'static str {
        match self.0 {}
    }
    fn upload_matrix(&self, _: &[HostTensor<'_>]) -> Result<Never, ModelError> {
        match self.0 {}
    }
    fn upload_vector(&self, _: &[HostTensor<'_>]) -> Result<Never, ModelError> {
        match self.0 {}
    }
    fn alloc_kv_cache(&self, _: &KvCacheSpec) -> Result<Never, ModelError> {
        match self.0 {}
    }
    fn prepare_step(&self, _: &ForwardBatch, _: &[f32]) -> Never {
        match self.0 {}
    }
    fn alloc(&self, _: usize, _: usize) -> Never {
        match self.0 {}
    }
    fn embed(&self, _: &Never, _: &Never, _: &mut Never) {
        match self.0 {}
    }
    fn matmul(&self, _: &Never, _: &Never, _: Option<&Never>, _: &mut Never) {
        match self.0 {}
    }
    fn rms_norm(&self, _: &Never, _: &Never, _: f32, _: &mut Never) {
        match self.0 {}
    }
    fn add_rms_norm(&self, _: &mut Never, _: &Never, _: &Never, _: f32, _: &mut Never) {
        match self.0 {}
    }
    fn add_assign(&self, _: &mut Never, _: &Never) {
        match self.0 {}
    }
    fn qk_norm_rope(&self, _: &mut Never, _: &AttnLayout, _: Option<QkNorm<'_, Never>>, _: &Never) {
        match self.0 {}
    }
    fn write_kv(&self, _: &mut Never, _: usize, _: &Never, _: &AttnLayout, _: &Never) {
        match self.0 {}
    }
    fn attention(&self, _: &Never, _: usize, _: &Never, _: &AttnLayout, _: &Never, _: &mut Never) {
        match self.0 {}
    }
    fn silu_mul(&self, _: &Never, _: &mut Never) {
        match self.0 {}
    }
    fn gather_logit_rows(&self, _: &Never, _: &Never, _: &mut Never) {
        match self.0 {}
    }
    fn to_host(&self, _: &Never) -> Vec<f32> {
        match self.0 {}
    }
    fn all_gather_cols(&self, _: &Never, _: &mut Never) {
        match self.0 {}
    }
}
