//! Model definitions: Hugging Face config parsing, safetensors loading and the decoder
//! forward pass shared by every backend.

mod config;
mod executor;
mod forward;
mod ranks;
mod shard;
mod weights;

use std::path::PathBuf;

pub use config::{Arch, ModelConfig, RopeScaling};
pub use executor::{
    build_cpu_tp_engine, build_engine, build_tp_engine, cpu_tp_backends, CpuTpExecutor,
    EngineOptions, ModelExecutor, TpExecutor,
};
pub use forward::Model;
pub use shard::TpShard;
pub use weights::{Checkpoint, DType, HostTensor};

/// Why a model could not be loaded. Every variant names the file or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}: model_type {arch:?} is not supported (llama, mistral, qwen2, qwen3)")]
    UnsupportedArch { path: PathBuf, arch: String },
    #[error("{dir}: tensor {tensor:?} is missing from the checkpoint")]
    MissingTensor { dir: PathBuf, tensor: String },
    #[error("{path}: tensor {tensor:?}: {msg}")]
    Weight {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    #[error("backend: {0}")]
    Backend(String),
}
