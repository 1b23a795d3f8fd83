//! Compiles `kernels/kernels.cu` with NVRTC for the device's architecture and caches the
//! PTX on disk, so only the first start on a machine pays the compile (a few seconds).
//!
//! The cache key hashes the source, the target architecture, the NVRTC version and this
//! crate's version; a stale or unreadable cache file is simply recompiled. The directory
//! is `$SWITCHYARD_CACHE_DIR`, else `$XDG_CACHE_HOME/switchyard`, else
//! `$HOME/.cache/switchyard`; when none is writable the PTX is kept in memory only.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{CompileOptions, Ptx};

use super::CudaError;

const SOURCE: &str = include_str!("kernels/kernels.cu");

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("SWITCHYARD_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("switchyard"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("switchyard"))
}

fn nvrtc_version() -> (i32, i32) {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters; the library was found present before we got here.
    let rc = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if rc == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        (major, minor)
    } else {
        (0, 0)
    }
}

/// Returns the PTX for `arch` (`compute_90`, say), from the disk cache or NVRTC.
fn ptx_for(arch: &str) -> Result<String, CudaError> {
    let mut h = DefaultHasher::new();
    SOURCE.hash(&mut h);
    arch.hash(&mut h);
    nvrtc_version().hash(&mut h);
    env!("CARGO_PKG_VERSION").hash(&mut h);
    let key = h.finish();
    let path = cache_dir().map(|d| d.join(format!("kernels-{key:016x}.ptx")));
    if let Some(p) = &path {
        if let Ok(ptx) = std::fs::read_to_string(p) {
            if ptx.contains(".entry") {
                return Ok(ptx);
            }
        }
    }
    let opts = CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        ..CompileOptions::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts)
        .map_err(|e| CudaError::Device(format!("compiling CUDA kernels with NVRTC: {e}")))?
        .to_src();
    if let Some(p) = &path {
        // A cache that cannot be written costs the next start a compile, nothing more.
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        let written = p
            .parent()
            .map(std::fs::create_dir_all)
            .transpose()
            .and_then(|_| std::fs::write(&tmp, &ptx))
            .and_then(|_| std::fs::rename(&tmp, p));
        if let Err(e) = written {
            tracing::debug!("kernel cache {} not written: {e}", p.display());
        }
    }
    Ok(ptx)
}

/// Every kernel the backend launches, looked up once.
pub struct Kernels {
    _module: Arc<CudaModule>,
    pub embed: CudaFunction,
    pub gather_rows: CudaFunction,
    pub rms_norm: CudaFunction,
    pub add_rms_norm: CudaFunction,
    pub add_assign: CudaFunction,
    pub add_bias: CudaFunction,
    pub silu_mul: CudaFunction,
    pub qk_norm_rope: CudaFunction,
    pub write_kv: CudaFunction,
    pub argmax_rows: CudaFunction,
    pub sample_rows: CudaFunction,
    pub bf16_to_f32: CudaFunction,
    pub decode_reduce: CudaFunction,
    /// The all-reduce of our own for ranks of one process (`allreduce.rs`).
    pub custom_all_reduce: CudaFunction,
    /// Its all-gather of the output layer's logit columns.
    pub custom_all_gather: CudaFunction,
    /// Rank blocks of an NCCL all-gather into logit columns.
    pub interleave_cols: CudaFunction,
    /// `gemv_M` for M = 1..=GEMV_MAX_ROWS, at index M - 1.
    pub gemv: Vec<CudaFunction>,
    /// `[head_dim index][group index]` for head_dim 16/32/64/128 and group 1/2/4/8.
    pub decode_attn: Vec<Vec<CudaFunction>>,
    /// Per head_dim 16/32/64/128.
    pub prefill_attn: Vec<CudaFunction>,
}

pub const HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];
pub const GROUPS: [usize; 4] = [1, 2, 4, 8];
/// Largest row count served by the skinny-GEMM kernels (`gemv_1` … `gemv_8`).
pub const GEMV_MAX_ROWS: usize = 8;
/// Warps per `gemv_M` block (`GEMV_WARPS` in the kernels).
pub const GEMV_WARPS: usize = 4;

/// Output columns each warp of `gemv_M` computes (the second argument of `GEMV(M, NR)` in
/// the kernels): more columns share each activation load, fewer keep small N spread.
pub fn gemv_cols_per_warp(m: usize) -> usize {
    match m {
        1 => 1,
        2 | 3 => 2,
        _ => 4,
    }
}

impl Kernels {
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self, CudaError> {
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| CudaError::Device(format!("reading compute capability: {e}")))?;
        if major < 8 {
            return Err(CudaError::Unavailable(format!(
                "compute capability {major}.{minor}: the kernels need 8.0 (Ampere) or newer"
            )));
        }
        let ptx = ptx_for(&format!("compute_{major}{minor}"))?;
        let module = ctx
            .load_module(Ptx::from_src(ptx))
            .map_err(|e| CudaError::Device(format!("loading the kernel module: {e}")))?;
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| CudaError::Device(format!("kernel {name}: {e}")))
        };
        let mut decode_attn = Vec::new();
        let mut prefill_attn = Vec::new();
        for hd in HEAD_DIMS {
            decode_attn.push(
                GROUPS
                    .iter()
                    .map(|g| f(&format!("decode_attn_{hd}_{g}")))
                    .collect::<Result<Vec<_>, _>>()?,
            );
            prefill_attn.push(f(&format!("prefill_attn_{hd}"))?);
        }
        Ok(Kernels {
            embed: f("embed")?,
            gather_rows: f("gather_rows")?,
            rms_norm: f("rms_norm")?,
            add_rms_norm: f("add_rms_norm")?,
            add_assign: f("add_assign")?,
            add_bias: f("add_bias")?,
            silu_mul: f("silu_mul")?,
            qk_norm_rope: f("qk_norm_rope")?,
            write_kv: f("write_kv")?,
            argmax_rows: f("argmax_rows")?,
            sample_rows: f("sample_rows")?,
            bf16_to_f32: f("bf16_to_f32")?,
            decode_reduce: f("decode_reduce")?,
            custom_all_reduce: f("custom_all_reduce")?,
            custom_all_gather: f("custom_all_gather")?,
            interleave_cols: f("interleave_cols")?,
            gemv: (1..=GEMV_MAX_ROWS)
                .map(|m| f(&format!("gemv_{m}")))
                .collect::<Result<Vec<_>, _>>()?,
            decode_attn,
            prefill_attn,
            _module: module,
        })
    }
}
