//! Tensor-parallel sharding (Megatron style): rank `r` of `world` holds a slice of the
//! attention heads and of the MLP's intermediate columns. q/k/v and gate/up are split by
//! output rows, o and down by input columns, so each rank's o and down projections produce
//! partial sums that one all-reduce per projection completes. Embeddings, norms and the
//! output layer are replicated. With more ranks than KV heads, each KV head is replicated
//! over the ranks whose query heads use it.

use std::ops::Range;

use super::{DType, HostTensor, ModelConfig, ModelError};

/// This process's place in a tensor-parallel group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TpShard {
    pub rank: usize,
    pub world: usize,
}

impl TpShard {
    pub const SINGLE: TpShard = TpShard { rank: 0, world: 1 };

    /// Checks that `cfg` can be split `world` ways.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<(), String> {
        let w = self.world;
        if w == 0 || self.rank >= w {
            return Err(format!("rank {} is outside a group of {w}", self.rank));
        }
        if !cfg.num_heads.is_multiple_of(w) {
            return Err(format!(
                "--tp {w} must divide the {} attention heads",
                cfg.num_heads
            ));
        }
        if !cfg.num_kv_heads.is_multiple_of(w) && !w.is_multiple_of(cfg.num_kv_heads) {
            return Err(format!(
                "--tp {w} must divide, or be a multiple of, the {} KV heads",
                cfg.num_kv_heads
            ));
        }
        if !cfg.intermediate_size.is_multiple_of(w) {
            return Err(format!(
                "--tp {w} must divide the intermediate size {}",
                cfg.intermediate_size
            ));
        }
        Ok(())
    }

    pub fn heads(&self, cfg: &ModelConfig) -> Range<usize> {
        let n = cfg.num_heads / self.world;
        self.rank * n..(self.rank + 1) * n
    }

    pub fn kv_heads(&self, cfg: &ModelConfig) -> Range<usize> {
        if self.world <= cfg.num_kv_heads {
            let n = cfg.num_kv_heads / self.world;
            self.rank * n..(self.rank + 1) * n
        } else {
            let group = cfg.num_heads / cfg.num_kv_heads;
            let first = self.heads(cfg).start / group;
            first..first + 1
        }
    }

    pub fn intermediate(&self, cfg: &ModelConfig) -> Range<usize> {
        let n = cfg.intermediate_size / self.world;
        self.rank * n..(self.rank + 1) * n
    }
}

/// A slice of a checkpoint tensor, copied out.
pub(crate) struct OwnedTensor {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl OwnedTensor {
    pub fn view(&self) -> HostTensor<'_> {
        HostTensor {
            name: &self.name,
            dtype: self.dtype,
            shape: &self.shape,
            bytes: &self.bytes,
        }
    }
}

/// How a tensor is split across ranks.
#[derive(Clone, Debug)]
pub(crate) enum Split {
    /// Rows `range` of dim 0 (output features, or the elements of a 1-D tensor).
    Rows(Range<usize>),
    /// Columns `range` of dim 1 (input features).
    Cols(Range<usize>),
}

/// The part of `t` this rank holds; `None` when that is all of it (no copy needed).
pub(crate) fn slice(t: &HostTensor<'_>, split: &Split) -> Result<Option<OwnedTensor>, ModelError> {
    let e = t.dtype.size();
    let rows = t.shape.first().copied().unwrap_or(1);
    let cols: usize = t.shape.iter().skip(1).product();
    let bad = |what: &str| ModelError::Backend(format!("tensor {:?}: {what}", t.name));
    let (shape, bytes) = match split {
        Split::Rows(r) if *r == (0..rows) => return Ok(None),
        Split::Cols(c) if t.shape.len() == 2 && *c == (0..cols) => return Ok(None),
        Split::Rows(r) => {
            if r.end > rows {
                return Err(bad("row slice out of range"));
            }
            let mut shape = t.shape.to_vec();
            shape[0] = r.len();
            let row_bytes = cols.max(1) * e;
            (
                shape,
                t.bytes[r.start * row_bytes..r.end * row_bytes].to_vec(),
            )
        }
        Split::Cols(c) => {
            if t.shape.len() != 2 || c.end > cols {
                return Err(bad("column slice out of range"));
            }
            let mut out = Vec::with_capacity(rows * c.len() * e);
            for row in t.bytes.chunks_exact(cols * e) {
                out.extend_from_slice(&row[c.start * e..c.end * e]);
            }
            (vec![rows, c.len()], out)
        }
    };
    Ok(Some(OwnedTensor {
        name: t.name.to_string(),
        dtype: t.dtype,
        shape,
        bytes,
    }))
}
