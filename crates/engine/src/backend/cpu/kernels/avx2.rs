//! The x86_64 fast path: AVX2 + FMA (+ F16C for f16 weights), selected at run time by
//! [`super::Isa::detect`]. Every function here is `unsafe` because it must only run on a CPU
//! with those features; callers also promise that the raw pointers cover the ranges the
//! doc comments name.
//!
//! Two matmul kernels live here (the dispatch and threading are in `matmul.rs`):
//! - `gemv_*` for a few activation rows, where the weights are streamed once from memory and
//!   the kernel must keep up with DRAM: dot products along `k`, a tile of `R` weight rows ×
//!   `M` activation rows, one horizontal sum per output at the end.
//! - `gemm_*` for many activation rows, where FMA throughput is the limit: a BLIS-style
//!   micro-kernel with a `MR × 8·NV` register tile of outputs. Weights are transposed once
//!   per matrix into panels (`pack_panels`, kept with the matrix, still in their stored
//!   element type and widened as they are loaded), each swept through L1 by a block of
//!   activation rows; activations are broadcast straight from the row-major input.

// Register tiles are indexed by (weight row, unroll step, activation row) at once; iterator
// chains would hide which accumulator each FMA feeds.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::matrix::{bf16_to_f32, f16_to_f32, WeightData};
use super::tiles::{next_block, RowTiles};

/// How a weight element type widens to f32, 8 lanes at a time.
pub(super) trait Widen {
    type Raw: Copy + Sync + Default;
    /// Loads 8 consecutive elements at `p` as f32.
    unsafe fn load8(p: *const Self::Raw) -> __m256;
    fn scalar(v: Self::Raw) -> f32;
    /// `WeightData` of this element type holding `v`.
    fn wrap(v: Vec<Self::Raw>) -> WeightData;
    /// The elements of `d`, which must be of this type.
    fn unwrap(d: &WeightData) -> &[Self::Raw];
}

pub(super) struct F32;
pub(super) struct Bf16;
pub(super) struct F16;

impl Widen for F32 {
    type Raw = f32;
    fn wrap(v: Vec<f32>) -> WeightData {
        WeightData::F32(v)
    }
    fn unwrap(d: &WeightData) -> &[f32] {
        match d {
            WeightData::F32(v) => v,
            _ => unreachable!("panels of another dtype"),
        }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    fn scalar(v: f32) -> f32 {
        v
    }
}

impl Widen for Bf16 {
    type Raw = u16;
    fn wrap(v: Vec<u16>) -> WeightData {
        WeightData::Bf16(v)
    }
    fn unwrap(d: &WeightData) -> &[u16] {
        match d {
            WeightData::Bf16(v) => v,
            _ => unreachable!("panels of another dtype"),
        }
    }
    /// bf16 is the high half of an f32: zero-extend to 32 bits, shift left by 16.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const u16) -> __m256 {
        let v = _mm_loadu_si128(p.cast());
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v)))
    }
    #[inline(always)]
    fn scalar(v: u16) -> f32 {
        bf16_to_f32(v)
    }
}

impl Widen for F16 {
    type Raw = u16;
    fn wrap(v: Vec<u16>) -> WeightData {
        WeightData::F16(v)
    }
    fn unwrap(d: &WeightData) -> &[u16] {
        match d {
            WeightData::F16(v) => v,
            _ => unreachable!("panels of another dtype"),
        }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
    #[inline(always)]
    fn scalar(v: u16) -> f32 {
        f16_to_f32(v)
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

// ---------------------------------------------------------------------------------------
// Vector helpers
// ---------------------------------------------------------------------------------------

/// Four independent accumulators hide the FMA latency.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (u, acc) in acc.iter_mut().enumerate() {
            let o = i + 8 * u;
            *acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(o)), _mm256_loadu_ps(pb.add(o)), *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i)),
            _mm256_loadu_ps(pb.add(i)),
            acc[0],
        );
        i += 8;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut sum = hsum(s);
    while i < n {
        sum += a[i] * b[i];
        i += 1;
    }
    sum
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let (px, py) = (x.as_ptr(), y.as_mut_ptr());
    let va = _mm256_set1_ps(alpha);
    let mut i = 0;
    while i + 8 <= n {
        let v = _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
        _mm256_storeu_ps(py.add(i), v);
        i += 8;
    }
    while i < n {
        y[i] = alpha.mul_add(x[i], y[i]);
        i += 1;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn scale(alpha: f32, x: &mut [f32]) {
    let n = x.len();
    let p = x.as_mut_ptr();
    let va = _mm256_set1_ps(alpha);
    let mut i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(p.add(i), _mm256_mul_ps(va, _mm256_loadu_ps(p.add(i))));
        i += 8;
    }
    while i < n {
        x[i] *= alpha;
        i += 1;
    }
}

/// Sums a buffer with enough independent adds in flight that DRAM, not latency, limits it.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn read_sum(a: &[f32]) -> f32 {
    let n = a.len();
    let p = a.as_ptr();
    let mut acc = [_mm256_setzero_ps(); 8];
    let mut i = 0;
    while i + 64 <= n {
        for (u, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_add_ps(*acc, _mm256_loadu_ps(p.add(i + 8 * u)));
        }
        i += 64;
    }
    let mut s = _mm256_setzero_ps();
    for a in acc {
        s = _mm256_add_ps(s, a);
    }
    hsum(s) + a[i..].iter().sum::<f32>()
}

// ---------------------------------------------------------------------------------------
// GEMV: few activation rows, memory-bound
// ---------------------------------------------------------------------------------------

/// `out[i * ldo + r] = Σ_kk x[i * k + kk] · w[r * k + kk] (+ bias[r])` for `r < R`,
/// `i < M`: `R` adjacent weight rows against `M` activation rows, with `U` accumulators per
/// pair along `k` so that `R·U·M ≥ 6` dot products are in flight to cover the FMA latency.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_tile<W: Widen, const R: usize, const U: usize, const M: usize>(
    w: *const W::Raw,
    x: *const f32,
    k: usize,
    bias: *const f32,
    out: *mut f32,
    ldo: usize,
) {
    let mut acc = [[[_mm256_setzero_ps(); M]; U]; R];
    let step = 8 * U;
    let kb = k - k % step;
    let mut kk = 0;
    while kk < kb {
        for u in 0..U {
            let mut wv = [_mm256_setzero_ps(); R];
            for (r, wv) in wv.iter_mut().enumerate() {
                *wv = W::load8(w.add(r * k + kk + 8 * u));
            }
            for i in 0..M {
                let xv = _mm256_loadu_ps(x.add(i * k + kk + 8 * u));
                for r in 0..R {
                    acc[r][u][i] = _mm256_fmadd_ps(wv[r], xv, acc[r][u][i]);
                }
            }
        }
        kk += step;
    }
    while kk + 8 <= k {
        for r in 0..R {
            let wv = W::load8(w.add(r * k + kk));
            for i in 0..M {
                let xv = _mm256_loadu_ps(x.add(i * k + kk));
                acc[r][0][i] = _mm256_fmadd_ps(wv, xv, acc[r][0][i]);
            }
        }
        kk += 8;
    }
    for r in 0..R {
        let b = if bias.is_null() { 0.0 } else { *bias.add(r) };
        for i in 0..M {
            let mut v = acc[r][0][i];
            for u in 1..U {
                v = _mm256_add_ps(v, acc[r][u][i]);
            }
            let mut s = hsum(v);
            for t in kk..k {
                s += W::scalar(*w.add(r * k + t)) * *x.add(i * k + t);
            }
            *out.add(i * ldo + r) = s + b;
        }
    }
}

/// How far ahead of the rows being multiplied `gemv_rows` prefetches.
const GEMV_PREFETCH_BYTES: usize = 2048;

/// Output columns `r0..r1` for all `m` activation rows.
///
/// Rows go in pairs, and for each pair the activation rows in groups of up to four, so a
/// weight row comes from DRAM once and from L1 for every further group. Every weight row
/// is software-prefetched `GEMV_PREFETCH_BYTES` ahead: the hardware prefetcher alone
/// follows the interleaved per-row streams (each only 1–3 KB long) at about 80% of the
/// bandwidth a plain sequential read gets.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemv_rows<W: Widen>(
    w: *const W::Raw,
    x: *const f32,
    m: usize,
    k: usize,
    n: usize,
    bias: *const f32,
    out: *mut f32,
    (r0, r1): (usize, usize),
) {
    let row_bytes = k * std::mem::size_of::<W::Raw>();
    let ahead = GEMV_PREFETCH_BYTES.div_ceil(row_bytes.max(1)).max(2);
    let mut r = r0;
    while r < r1 {
        let pair = r + 2 <= r1;
        let rows = if pair { 2 } else { 1 };
        if r + ahead + rows <= r1 {
            Prefetcher::<W>::new(w.add((r + ahead) * k), k, rows, k).issue(usize::MAX);
        }
        let wr = w.add(r * k);
        let br = if bias.is_null() { bias } else { bias.add(r) };
        let mut i = 0;
        while i < m {
            let g = (m - i).min(4);
            let (xi, oi) = (x.add(i * k), out.add(i * n + r));
            match (pair, g) {
                (true, 4) => gemv_tile::<W, 2, 1, 4>(wr, xi, k, br, oi, n),
                (true, 3) => gemv_tile::<W, 2, 1, 3>(wr, xi, k, br, oi, n),
                (true, 2) => gemv_tile::<W, 2, 2, 2>(wr, xi, k, br, oi, n),
                (true, _) => {
                    gemv_tile::<W, 1, 4, 1>(wr, xi, k, br, oi, n);
                    let br1 = if br.is_null() { br } else { br.add(1) };
                    gemv_tile::<W, 1, 4, 1>(wr.add(k), xi, k, br1, oi.add(1), n);
                }
                (false, 4) => gemv_tile::<W, 1, 2, 4>(wr, xi, k, br, oi, n),
                (false, 3) => gemv_tile::<W, 1, 2, 3>(wr, xi, k, br, oi, n),
                (false, 2) => gemv_tile::<W, 1, 4, 2>(wr, xi, k, br, oi, n),
                (false, _) => gemv_tile::<W, 1, 4, 1>(wr, xi, k, br, oi, n),
            }
            i += g;
        }
        r += rows;
    }
}

// ---------------------------------------------------------------------------------------
// GEMM: many activation rows, compute-bound
// ---------------------------------------------------------------------------------------

/// The register tile's multiply-adds. While it runs, the first `pf_lines` k steps each
/// prefetch one cache line from `pf` onwards (the panel that comes next), so the fetch is
/// spread over the compute instead of stalling on a burst of misses.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn accumulate<W: Widen, const MR: usize, const NV: usize>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const W::Raw,
    pf: *const u8,
    pf_lines: usize,
) -> [[__m256; NV]; MR] {
    let nr = 8 * NV;
    let mut acc = [[_mm256_setzero_ps(); NV]; MR];
    for p in 0..kc {
        if p < pf_lines {
            // `wrapping_add`: a prefetch of any address is harmless.
            _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(64 * p).cast());
        }
        let mut bv = [_mm256_setzero_ps(); NV];
        for (v, bv) in bv.iter_mut().enumerate() {
            *bv = W::load8(b.add(p * nr + 8 * v));
        }
        for (i, acc) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*a.add(i * lda + p));
            for v in 0..NV {
                acc[v] = _mm256_fmadd_ps(av, bv[v], acc[v]);
            }
        }
    }
    acc
}

/// `C[MR × cols] (+)= A[MR × kc] · B[kc × 8·NV]` where `A` is row-major with stride `lda`,
/// `B` is a packed panel, and only the first `cols` columns of the tile are stored. With
/// `first`, `C` is overwritten (plus `bias` when non-null) instead of accumulated into.
/// `pf`, `pf_lines`: see `accumulate`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_micro<W: Widen, const MR: usize, const NV: usize>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const W::Raw,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    first: bool,
    bias: *const f32,
    (pf, pf_lines): (*const u8, usize),
) {
    let nr = 8 * NV;
    let acc = accumulate::<W, MR, NV>(kc, a, lda, b, pf, pf_lines);
    if cols == nr {
        for (i, acc) in acc.iter().enumerate() {
            for (v, &acc) in acc.iter().enumerate() {
                let cp = c.add(i * ldc + 8 * v);
                let base = if !first {
                    _mm256_loadu_ps(cp)
                } else if !bias.is_null() {
                    _mm256_loadu_ps(bias.add(8 * v))
                } else {
                    _mm256_setzero_ps()
                };
                _mm256_storeu_ps(cp, _mm256_add_ps(base, acc));
            }
        }
    } else {
        let mut tile = [[0.0f32; 32]; MR];
        for (i, acc) in acc.iter().enumerate() {
            for (v, &acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(tile[i].as_mut_ptr().add(8 * v), acc);
            }
        }
        for (i, row) in tile.iter().enumerate() {
            for (j, &t) in row.iter().enumerate().take(cols) {
                let cp = c.add(i * ldc + j);
                let base = if !first {
                    *cp
                } else if !bias.is_null() {
                    *bias.add(j)
                } else {
                    0.0
                };
                *cp = base + t;
            }
        }
    }
}

/// One `gemm_micro` call for the 1–7 activation rows left over after the whole tiles.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_micro_tail<W: Widen, const NV: usize>(
    rows: usize,
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const W::Raw,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    first: bool,
    bias: *const f32,
    pf: (*const u8, usize),
) {
    match rows {
        1 => gemm_micro::<W, 1, NV>(kc, a, lda, b, c, ldc, cols, first, bias, pf),
        2 => gemm_micro::<W, 2, NV>(kc, a, lda, b, c, ldc, cols, first, bias, pf),
        3 => gemm_micro::<W, 3, NV>(kc, a, lda, b, c, ldc, cols, first, bias, pf),
        4 => gemm_micro::<W, 4, NV>(kc, a, lda, b, c, ldc, cols, first, bias, pf),
        5 => gemm_micro::<W, 5, NV>(kc, a, lda, b, c, ldc, cols, first, bias, pf),
        6 => gemm_micro::<W, 6, NV>(kc, a, lda, b, c, ldc, cols, first, bias, pf),
        7 => gemm_micro::<W, 7, NV>(kc, a, lda, b, c, ldc, cols, first, bias, pf),
        _ => unreachable!("tail of {rows} rows"),
    }
}

/// Walks the cache lines of `rows` rows of `len` elements (row stride `k`) and prefetches
/// them a few at a time.
struct Prefetcher<W: Widen> {
    base: *const u8,
    row_stride: usize,
    row_bytes: usize,
    rows: usize,
    row: usize,
    off: usize,
    _w: std::marker::PhantomData<W>,
}

impl<W: Widen> Prefetcher<W> {
    fn new(w: *const W::Raw, k: usize, rows: usize, len: usize) -> Self {
        let size = std::mem::size_of::<W::Raw>();
        Prefetcher {
            base: w.cast(),
            row_stride: k * size,
            row_bytes: len * size,
            rows,
            row: 0,
            off: 0,
            _w: std::marker::PhantomData,
        }
    }

    /// Issues up to `count` more prefetches.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn issue(&mut self, count: usize) {
        let mut left = count;
        while left > 0 && self.row < self.rows {
            // `wrapping_add`: a prefetch of any address is harmless, and this keeps the
            // pointer arithmetic free of provenance questions.
            let p = self
                .base
                .wrapping_add(self.row * self.row_stride + self.off);
            _mm_prefetch::<_MM_HINT_T0>(p.cast());
            self.off += 64;
            if self.off >= self.row_bytes {
                self.off = 0;
                self.row += 1;
            }
            left -= 1;
        }
    }
}

/// Packs all `n` rows of `w` (row stride `k`) into panels of `8·NV` rows, panel `p` at
/// `dst[p · k · 8·NV ..]` as `[k][8·NV]`: the layout `gemm_packed` reads, in the weights'
/// own element type, rows past `n` left as `dst` had them (zero).
pub(super) fn pack_panels<W: Widen, const NV: usize>(
    w: &[W::Raw],
    k: usize,
    n: usize,
    dst: &mut [W::Raw],
) {
    let nr = 8 * NV;
    for (p, panel) in dst.chunks_exact_mut(k * nr).enumerate() {
        let j0 = p * nr;
        for j in 0..nr.min(n - j0) {
            let row = &w[(j0 + j) * k..(j0 + j + 1) * k];
            for (kk, &v) in row.iter().enumerate() {
                panel[kk * nr + j] = v;
            }
        }
    }
}

/// Output columns (weight rows) of panels `p0..p1` for `m` activation rows, from weights
/// packed by `pack_panels`. `k` is taken in blocks of `kc_block`, and within a block every
/// panel is swept by all `m` rows, `MR` at a time, so the block of activations stays in L2
/// while the panels stream through L1.
///
/// Each output is one chain of multiply-adds along `k` per block, the blocks added in
/// order: the same arithmetic whatever `m`, the row range or the panel range, so a row's
/// result does not depend on the rows next to it or on how the threads split the work.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_packed<W: Widen, const MR: usize, const NV: usize>(
    panels: *const W::Raw,
    x: *const f32,
    m: usize,
    k: usize,
    n: usize,
    bias: *const f32,
    out: *mut f32,
    (p0, p1): (usize, usize),
    kc_block: usize,
) {
    const { assert!(MR <= 6 && NV <= 4, "tail kernels and tile sizes") };
    let nr = 8 * NV;
    let row_tiles = RowTiles::new(m, MR);
    let tiles = row_tiles.count();
    let mut pc = 0;
    while pc < k {
        let kc = kc_block.min(k - pc);
        let first = pc == 0;
        for jp in p0..p1 {
            let j0 = jp * nr;
            let cols = nr.min(n - j0);
            let b = if bias.is_null() { bias } else { bias.add(j0) };
            let bp = panels.add((jp * k + pc) * nr);
            // The next block's lines are shared out among this panel's tiles.
            let next = next_block(jp, (p0, p1), pc, kc, k, kc_block);
            let (pf_base, pf_total) = match next {
                Some((np, npc, nkc)) => {
                    let bytes = nkc * nr * std::mem::size_of::<W::Raw>();
                    (panels.add((np * k + npc) * nr).cast::<u8>(), bytes / 64)
                }
                None => (std::ptr::null(), 0),
            };
            let per_tile = pf_total.div_ceil(tiles);
            let mut t = 0;
            let pf = |t: usize| {
                let start = (t * per_tile).min(pf_total);
                let lines = per_tile.min(pf_total - start).min(kc);
                (pf_base.wrapping_add(64 * start), lines)
            };
            let mut i = 0;
            while i < m {
                let rows = row_tiles.rows_at(i);
                let (a, c) = (x.add(i * k + pc), out.add(i * n + j0));
                if rows == MR {
                    gemm_micro::<W, MR, NV>(kc, a, k, bp, c, n, cols, first, b, pf(t));
                } else {
                    gemm_micro_tail::<W, NV>(rows, kc, a, k, bp, c, n, cols, first, b, pf(t));
                }
                i += rows;
                t += 1;
            }
        }
        pc += kc;
    }
}
