//! Tensor-parallel sharding (Megatron style): rank `r` of `world` holds a slice of the
//! attention heads and of the MLP's intermediate columns. q/k/v and gate/up are split by
//! output rows, o and down by input columns, so each rank's o and down projections produce
//! partial sums that one all-reduce per projection completes. The output layer is split
//! by vocabulary rows: each rank computes its share of every logit row, and one all-gather
//! puts the rows together. Embeddings and norms are replicated. With more ranks than KV
//! heads, each KV head is replicated over the ranks whose query heads use it.

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

    /// Logit columns each rank computes: the vocabulary split evenly, rounded up, so that
    /// every rank's share has the same width (the last rank's is padded with zero rows).
    pub fn vocab_width(&self, cfg: &ModelConfig) -> usize {
        cfg.vocab_size.div_ceil(self.world)
    }

    /// The vocabulary rows of the output layer this rank holds (fewer than
    /// [`vocab_width`](Self::vocab_width) on the last rank when the split is uneven).
    pub fn vocab(&self, cfg: &ModelConfig) -> Range<usize> {
        let w = self.vocab_width(cfg);
        let start = (self.rank * w).min(cfg.vocab_size);
        start..(start + w).min(cfg.vocab_size)
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
    /// Rows `range` of dim 0, then zero rows up to `width` rows in all.
    RowsPadded { range: Range<usize>, width: usize },
}

/// The part of `t` this rank holds; `None` when that is all of it (no copy needed).
pub(crate) fn slice(t: &HostTensor<'_>, split: &Split) -> Result<Option<OwnedTensor>, ModelError> {
    let e = t.dtype.size();
    let rows = t.shape.first().copied().unwrap_or(1);
    let cols: usize = t.shape.iter().skip(1).product();
    let bad = |what: &str| ModelError::Backend(format!("tensor {:?}: {what}", t.name));
    let (shape, bytes) = match split {
        Split::RowsPadded { range, width } if *range == (0..rows) && *width == rows => {
            return Ok(None)
        }
        Split::RowsPadded { range, width } => {
            if range.end > rows || range.len() > *width {
                return Err(bad("row slice out of range"));
            }
            let mut shape = t.shape.to_vec();
            shape[0] = *width;
            let row_bytes = cols.max(1) * e;
            let mut bytes = t.bytes[range.start * row_bytes..range.end * row_bytes].to_vec();
            bytes.resize(width * row_bytes, 0);
            (shape, bytes)
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocab_rows_split_evenly_and_pad_the_last_rank() {
        let base = ModelConfig::from_json_str(
            r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":2,
            "vocab_size":32}"#,
            std::path::Path::new("config.json"),
        )
        .unwrap();
        let cfg = |vocab| ModelConfig {
            vocab_size: vocab,
            ..base.clone()
        };
        let ranges = |vocab, world| -> Vec<(Range<usize>, usize)> {
            (0..world)
                .map(|rank| {
                    let s = TpShard { rank, world };
                    (s.vocab(&cfg(vocab)), s.vocab_width(&cfg(vocab)))
                })
                .collect()
        };
        assert_eq!(ranges(8, 2), vec![(0..4, 4), (4..8, 4)]);
        assert_eq!(
            ranges(10, 4),
            vec![(0..3, 3), (3..6, 3), (6..9, 3), (9..10, 3)]
        );
        // More ranks than rows: the last ones hold padding only.
        assert_eq!(
            ranges(2, 4),
            vec![(0..1, 1), (1..2, 1), (2..2, 1), (2..2, 1)]
        );
    }

    #[test]
    fn padded_rows_are_zero() {
        let bytes: Vec<u8> = (1..=12u8).collect();
        let t = HostTensor {
            name: "w",
            dtype: DType::F32,
            shape: &[3, 1],
            bytes: &bytes,
        };
        let split = Split::RowsPadded {
            range: 2..3,
            width: 2,
        };
        let got = slice(&t, &split).unwrap().unwrap();
        assert_eq!(got.shape, vec![2, 1]);
        assert_eq!(got.bytes, vec![9, 10, 11, 12, 0, 0, 0, 0]);
        let whole = Split::RowsPadded {
            range: 0..3,
            width: 3,
        };
        assert!(
            slice(&t, &whole).unwrap().is_none(),
            "no copy when nothing is cut"
        );
    }
}
