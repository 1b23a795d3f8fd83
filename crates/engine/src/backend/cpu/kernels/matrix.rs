//! Weight matrices as the CPU kernels read them: Hugging Face layout (`[out_features,
//! in_features]`, row-major, so `y = x · Wᵀ`) with the element type kept as stored in the
//! checkpoint. bf16 and f16 stay as raw bits and are widened to f32 inside the kernels,
//! which halves the bytes a memory-bound decode step has to stream.
//!
//! A matrix also carries a lazily built second copy for the compute-bound regime (many
//! activation rows): the same elements transposed into panels for the GEMM micro-kernel.
//! See [`Panels`].

use std::sync::OnceLock;

/// The elements of a [`Matrix`], row-major. bf16 and f16 hold the raw IEEE bits.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightData {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    F16(Vec<u16>),
}

impl WeightData {
    fn len(&self) -> usize {
        match self {
            WeightData::F32(v) => v.len(),
            WeightData::Bf16(v) | WeightData::F16(v) => v.len(),
        }
    }

    fn dtype_name(&self) -> &'static str {
        match self {
            WeightData::F32(_) => "f32",
            WeightData::Bf16(_) => "bf16",
            WeightData::F16(_) => "f16",
        }
    }
}

/// A weight matrix of `rows` output features by `cols` input features.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: WeightData,
    /// Filled by the first matmul that takes the GEMM path, or at load by
    /// `keep_packed_only`.
    pub(super) panels: Panels,
    /// `data` was dropped (left empty) after packing: the panels are the only copy (see
    /// [`Matrix::keep_packed_only`]).
    pub(super) packed_only: bool,
}

/// The weights laid out as the GEMM micro-kernel reads them (transposed panels, same
/// element type), built once on first use. Without it every GEMM call transposed and
/// widened all its weights again, which held a 32-row decode step's matmuls to ~80% of the
/// FMA peak. Keeping the stored element type rather than f32 halves the bytes a 32-row
/// step streams for bf16 weights (measured 12% faster than f32 panels on one thread at
/// m = 32, equal at m = 2048) and costs only as much memory again as the weights, paid
/// by matrices that ever see more than a few rows at once.
///
/// The AVX-512 BF16 path reads bf16 weights in another layout (pairs of `k`, see
/// `avx512::pack_pair_panels`), kept beside it; a process builds only the one its ISA uses.
#[derive(Clone, Default)]
pub(super) struct Panels {
    pub(super) packed: OnceLock<WeightData>,
    pub(super) bf16_pairs: OnceLock<Vec<u32>>,
}

impl std::fmt::Debug for Panels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let built = |b: bool| if b { "built" } else { "not built" };
        write!(
            f,
            "Panels(packed: {}, bf16 pairs: {})",
            built(self.packed.get().is_some()),
            built(self.bf16_pairs.get().is_some())
        )
    }
}

/// A cache derived from the weights, so it never makes two matrices differ.
impl PartialEq for Panels {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Matrix {
    /// Panics if `data.len() != rows * cols`: a shape mismatch here is a loader bug.
    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        Self::new(rows, cols, WeightData::F32(data))
    }

    /// `bits` are bf16 values as stored in safetensors (the top half of an f32).
    pub fn from_bf16_bits(rows: usize, cols: usize, bits: Vec<u16>) -> Self {
        Self::new(rows, cols, WeightData::Bf16(bits))
    }

    /// `bits` are IEEE 754 binary16 values.
    pub fn from_f16_bits(rows: usize, cols: usize, bits: Vec<u16>) -> Self {
        Self::new(rows, cols, WeightData::F16(bits))
    }

    fn new(rows: usize, cols: usize, data: WeightData) -> Self {
        let expected = rows
            .checked_mul(cols)
            .expect("matrix shape overflows usize");
        assert_eq!(
            data.len(),
            expected,
            "{} matrix {rows}x{cols} needs {expected} elements",
            data.dtype_name()
        );
        Matrix {
            rows,
            cols,
            data,
            panels: Panels::default(),
            packed_only: false,
        }
    }

    /// Stacks matrices vertically (q, k, v into one qkv projection; gate and up into one),
    /// so one matmul streams all of them. The parts must share dtype and column count.
    pub fn concat_rows(parts: Vec<Matrix>) -> Result<Matrix, String> {
        let first = parts
            .first()
            .ok_or("concat_rows needs at least one matrix")?;
        let cols = first.cols;
        let dtype = first.data.dtype_name();
        for (i, p) in parts.iter().enumerate() {
            if p.cols != cols {
                return Err(format!(
                    "concat_rows: part {i} has {} columns, part 0 has {cols}",
                    p.cols
                ));
            }
            if p.data.dtype_name() != dtype {
                return Err(format!(
                    "concat_rows: part {i} is {}, part 0 is {dtype}",
                    p.data.dtype_name()
                ));
            }
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let mut parts = parts.into_iter();
        // The first part's buffer is reused so the common case copies each other part once.
        let first = parts.next().expect("checked non-empty above");
        let data = match first.data {
            WeightData::F32(mut v) => {
                v.reserve(rows * cols - v.len());
                for p in parts {
                    if let WeightData::F32(d) = p.data {
                        v.extend_from_slice(&d);
                    }
                }
                WeightData::F32(v)
            }
            WeightData::Bf16(mut v) => {
                v.reserve(rows * cols - v.len());
                for p in parts {
                    if let WeightData::Bf16(d) = p.data {
                        v.extend_from_slice(&d);
                    }
                }
                WeightData::Bf16(v)
            }
            WeightData::F16(mut v) => {
                v.reserve(rows * cols - v.len());
                for p in parts {
                    if let WeightData::F16(d) = p.data {
                        v.extend_from_slice(&d);
                    }
                }
                WeightData::F16(v)
            }
        };
        Ok(Matrix::new(rows, cols, data))
    }

    /// For a matrix that is only ever multiplied (not read by row): on the AVX-512 BF16
    /// path, packs bf16 weights into the GEMM's panels now (on the kernel pool) and frees
    /// the row-major copy, which that path never reads, so the weights are held once
    /// rather than twice and the first matmul does not stall on packing. Elsewhere it does
    /// nothing. Returns whether it packed.
    pub fn keep_packed_only(&mut self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if !self.packed_only && super::has_avx512_bf16() {
            if let WeightData::Bf16(d) = &self.data {
                if !d.is_empty() {
                    let packed = super::matmul::pack_bf16_pairs(d, self.cols, self.rows);
                    // Already set by an earlier matmul means the same panels: keep those.
                    let _ = self.panels.bf16_pairs.set(packed);
                    self.data = WeightData::Bf16(Vec::new());
                    self.packed_only = true;
                    return true;
                }
            }
        }
        false
    }

    /// Widens row `r` into `out` (length `cols`); used for embedding lookups.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows, "row {r} out of range for {} rows", self.rows);
        assert_eq!(out.len(), self.cols, "row_f32 output length");
        #[cfg(target_arch = "x86_64")]
        if self.packed_only {
            let pairs = self
                .panels
                .bf16_pairs
                .get()
                .expect("packed matrix has panels");
            super::matmul::bf16_pairs_row(pairs, self.cols, r, out);
            return;
        }
        let range = r * self.cols..(r + 1) * self.cols;
        match &self.data {
            WeightData::F32(v) => out.copy_from_slice(&v[range]),
            WeightData::Bf16(v) => {
                for (o, &b) in out.iter_mut().zip(&v[range]) {
                    *o = bf16_to_f32(b);
                }
            }
            WeightData::F16(v) => {
                for (o, &b) in out.iter_mut().zip(&v[range]) {
                    *o = f16_to_f32(b);
                }
            }
        }
    }

    /// Bytes of weight data, i.e. what one pass of a matmul streams from memory.
    pub fn bytes(&self) -> usize {
        if self.packed_only {
            return 2 * self.rows * self.cols;
        }
        match &self.data {
            WeightData::F32(v) => v.len() * 4,
            WeightData::Bf16(v) | WeightData::F16(v) => v.len() * 2,
        }
    }
}

/// bf16 is the top half of an f32, so widening is exact.
#[inline(always)]
pub(crate) fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

#[inline(always)]
pub(crate) fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concat_rows_stacks_in_order() {
        let a = Matrix::from_f32(1, 2, vec![1.0, 2.0]);
        let b = Matrix::from_f32(2, 2, vec![3.0, 4.0, 5.0, 6.0]);
        let c = Matrix::concat_rows(vec![a, b]).unwrap();
        assert_eq!((c.rows, c.cols), (3, 2));
        assert_eq!(c.data, WeightData::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));

        let q = Matrix::from_bf16_bits(1, 1, vec![0x3f80]);
        let k = Matrix::from_bf16_bits(1, 1, vec![0x4000]);
        let qk = Matrix::concat_rows(vec![q, k]).unwrap();
        assert_eq!(qk.data, WeightData::Bf16(vec![0x3f80, 0x4000]));
        assert_eq!(qk.bytes(), 4);
    }

    #[test]
    fn concat_rows_rejects_mismatches() {
        assert!(Matrix::concat_rows(vec![]).is_err());
        let a = Matrix::from_f32(1, 2, vec![0.0; 2]);
        let b = Matrix::from_f32(1, 3, vec![0.0; 3]);
        assert!(Matrix::concat_rows(vec![a.clone(), b]).is_err());
        let h = Matrix::from_f16_bits(1, 2, vec![0; 2]);
        assert!(Matrix::concat_rows(vec![a, h]).is_err());
    }

    #[test]
    fn row_f32_widens_every_dtype() {
        let mut out = [0.0f32; 2];
        Matrix::from_bf16_bits(2, 2, vec![0, 0, 0x3f80, 0xc040]).row_f32(1, &mut out);
        assert_eq!(out, [1.0, -3.0]);
        Matrix::from_f16_bits(1, 2, vec![0x3c00, 0x4500]).row_f32(0, &mut out);
        assert_eq!(out, [1.0, 5.0]);
        Matrix::from_f32(1, 2, vec![7.0, 8.0]).row_f32(0, &mut out);
        assert_eq!(out, [7.0, 8.0]);
    }

    #[test]
    #[should_panic(expected = "needs 6 elements")]
    fn shape_mismatch_panics() {
        Matrix::from_f32(2, 3, vec![0.0; 5]);
    }
}
