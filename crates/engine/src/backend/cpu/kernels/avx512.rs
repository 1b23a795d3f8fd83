//! The bf16 dot-product path: AVX-512 with the BF16 extension (`vdpbf16ps`: 32 bf16
//! multiply-adds into 16 f32 sums per instruction), selected at run time by
//! [`super::Isa::detect`] and used for bf16 weights only. On Zen 4 it does twice the
//! multiply-adds per cycle of f32 FMA and needs no widening of the weights.
//!
//! The activations are rounded to bf16 (round to nearest even) once per matmul call, into
//! pairs: `u32` `j` of a row holds elements `2j` (low half) and `2j + 1` (high half), a
//! row padded with a zero when `k` is odd. Each `vdpbf16ps` lane adds the two products of
//! a pair, exact in f32, to its f32 sum, so the result is an f32 dot product of the
//! bf16-rounded activations with the weights — the precision GPU engines and vLLM's CPU
//! backend run bf16 models at.
//!
//! Every function here is `unsafe` because it must only run on a CPU with AVX-512 F, BW
//! and BF16; callers also promise that the raw pointers cover the ranges the doc comments
//! name. The dispatch and threading are in `matmul.rs`.

// Register tiles are indexed by (activation row, weight vector) at once; iterator chains
// would hide which accumulator each multiply-add feeds.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::tiles::{next_block, RowTiles};

/// The low `n` bits set, for masked loads and stores of the last partial vector.
#[inline(always)]
pub(crate) fn mask16(n: usize) -> __mmask16 {
    if n >= 16 {
        u16::MAX
    } else {
        (1u16 << n) - 1
    }
}

#[inline(always)]
fn bh(v: __m512i) -> __m512bh {
    // SAFETY: both are 512 bits of plain data.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

/// `acc + Σ` over each lane's pair of `a[2l]·b[2l] + a[2l+1]·b[2l+1]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn dp(acc: __m512, a: __m512i, b: __m512i) -> __m512 {
    _mm512_dpbf16_ps(acc, bh(a), bh(b))
}

/// Rounds rows `r0..r1` of `x` (`k` f32 each) to bf16 pairs, row `i` at `dst[i * kp ..]`
/// with `kp = k.div_ceil(2)`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn round_to_bf16_pairs(
    x: *const f32,
    k: usize,
    dst: *mut u32,
    (r0, r1): (usize, usize),
) {
    let kp = k.div_ceil(2);
    for i in r0..r1 {
        let (src, d) = (x.add(i * k), dst.add(i * kp));
        let mut j = 0;
        while j < k {
            let rest = k - j;
            let (lo, hi) = if rest >= 32 {
                (
                    _mm512_loadu_ps(src.add(j)),
                    _mm512_loadu_ps(src.add(j + 16)),
                )
            } else {
                (
                    _mm512_maskz_loadu_ps(mask16(rest), src.add(j)),
                    _mm512_maskz_loadu_ps(mask16(rest.saturating_sub(16)), src.add(j + 16)),
                )
            };
            // The second argument fills the low 16 bf16 lanes.
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_mask_storeu_epi32(d.add(j / 2).cast(), mask16(rest.div_ceil(2)), v);
            j += 32;
        }
    }
}

/// Packs all `n` rows of `w` (bf16, row stride `k`) into panels of `16·NV` rows, panel `p`
/// at `dst[p · kp · 16·NV ..]` as `[kp][16·NV]` pairs (`kp = k.div_ceil(2)`), the layout
/// `gemm_packed` reads; rows past `n` and the odd `k`'s last high half left as `dst` had
/// them (zero).
pub(super) fn pack_pair_panels<const NV: usize>(w: &[u16], k: usize, n: usize, dst: &mut [u32]) {
    let (nr, kp) = (16 * NV, k.div_ceil(2));
    for (p, panel) in dst.chunks_exact_mut(kp * nr).enumerate() {
        let j0 = p * nr;
        for j in 0..nr.min(n - j0) {
            let row = &w[(j0 + j) * k..(j0 + j + 1) * k];
            for (q, pair) in row.chunks(2).enumerate() {
                let hi = pair.get(1).copied().unwrap_or(0);
                panel[q * nr + j] = u32::from(pair[0]) | u32::from(hi) << 16;
            }
        }
    }
}

/// The register tile's multiply-adds over `kc` pairs; the first `pf_lines` steps each
/// prefetch one cache line from `pf` onwards (the panel that comes next).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn accumulate<const MR: usize, const NV: usize>(
    kc: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    pf: *const u8,
    pf_lines: usize,
) -> [[__m512; NV]; MR] {
    let nr = 16 * NV;
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    for p in 0..kc {
        if p < pf_lines {
            _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(64 * p).cast());
        }
        let mut bv = [_mm512_setzero_si512(); NV];
        for (v, bv) in bv.iter_mut().enumerate() {
            *bv = _mm512_loadu_si512(b.add(p * nr + 16 * v).cast());
        }
        for (i, acc) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_epi32(*a.add(i * lda + p) as i32);
            for v in 0..NV {
                acc[v] = dp(acc[v], av, bv[v]);
            }
        }
    }
    acc
}

/// `C[MR × cols] (+)= A[MR × kc pairs] · B[kc pairs × 16·NV]`, `A` row-major with stride
/// `lda` pairs, `B` a packed panel; only the first `cols` columns of the tile are stored.
/// With `first`, `C` is overwritten (plus `bias` when non-null) instead of accumulated
/// into. `pf`: see `accumulate`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_micro<const MR: usize, const NV: usize>(
    kc: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    first: bool,
    bias: *const f32,
    (pf, pf_lines): (*const u8, usize),
) {
    let acc = accumulate::<MR, NV>(kc, a, lda, b, pf, pf_lines);
    for (i, acc) in acc.iter().enumerate() {
        for (v, &acc) in acc.iter().enumerate() {
            let live = cols.saturating_sub(16 * v).min(16);
            if live == 0 {
                break;
            }
            let mk = mask16(live);
            let cp = c.add(i * ldc + 16 * v);
            let base = if !first {
                _mm512_maskz_loadu_ps(mk, cp)
            } else if !bias.is_null() {
                _mm512_maskz_loadu_ps(mk, bias.add(16 * v))
            } else {
                _mm512_setzero_ps()
            };
            _mm512_mask_storeu_ps(cp, mk, _mm512_add_ps(base, acc));
        }
    }
}

/// One `gemm_micro` call for the rows left over after the whole tiles.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_micro_tail<const NV: usize>(
    rows: usize,
    kc: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    first: bool,
    bias: *const f32,
    pf: (*const u8, usize),
) {
    match rows {
        1 => gemm_micro::<1, NV>(kc, a, lda, b, c, ldc, cols, first, bias, pf),
        2 => gemm_micro::<2, NV>(kc, a, lda, b, c, ldc, cols, first, bias, pf),
        3 => gemm_micro::<3, NV>(kc, a, lda, b, c, ldc, cols, first, bias, pf),
        4 => gemm_micro::<4, NV>(kc, a, lda, b, c, ldc, cols, first, bias, pf),
        5 => gemm_micro::<5, NV>(kc, a, lda, b, c, ldc, cols, first, bias, pf),
        6 => gemm_micro::<6, NV>(kc, a, lda, b, c, ldc, cols, first, bias, pf),
        7 => gemm_micro::<7, NV>(kc, a, lda, b, c, ldc, cols, first, bias, pf),
        8 => gemm_micro::<8, NV>(kc, a, lda, b, c, ldc, cols, first, bias, pf),
        _ => unreachable!("tail of {rows} rows"),
    }
}

/// Output columns (weight rows) of panels `p0..p1` for `m` activation rows (bf16 pairs,
/// row stride `kp`), from weights packed by `pack_pair_panels`. `kp` is taken in blocks
/// of `kc_block` pairs, and within a block every panel is swept by all `m` rows, `MR` at a
/// time, so the block of activations stays in L2 while the panels stream through L1.
///
/// Each output is one chain of multiply-adds along `k` per block, the blocks added in
/// order: the same arithmetic whatever `m`, the row range or the panel range, so a row's
/// result does not depend on the rows next to it or on how the threads split the work.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_packed<const MR: usize, const NV: usize>(
    panels: *const u32,
    x: *const u32,
    m: usize,
    kp: usize,
    n: usize,
    bias: *const f32,
    out: *mut f32,
    (p0, p1): (usize, usize),
    kc_block: usize,
) {
    const { assert!(MR <= 8 && NV <= 4, "tail kernels and tile sizes") };
    let nr = 16 * NV;
    let row_tiles = RowTiles::new(m, MR);
    let tiles = row_tiles.count();
    let mut pc = 0;
    while pc < kp {
        let kc = kc_block.min(kp - pc);
        let first = pc == 0;
        for jp in p0..p1 {
            let j0 = jp * nr;
            let cols = nr.min(n - j0);
            let b = if bias.is_null() { bias } else { bias.add(j0) };
            let bp = panels.add((jp * kp + pc) * nr);
            let next = next_block(jp, (p0, p1), pc, kc, kp, kc_block);
            let (pf_base, pf_total) = match next {
                Some((np, npc, nkc)) => {
                    (panels.add((np * kp + npc) * nr).cast::<u8>(), nkc * nr / 16)
                }
                None => (std::ptr::null(), 0),
            };
            let per_tile = pf_total.div_ceil(tiles);
            let pf = |t: usize| {
                let start = (t * per_tile).min(pf_total);
                let lines = per_tile.min(pf_total - start).min(kc);
                (pf_base.wrapping_add(64 * start), lines)
            };
            let mut t = 0;
            let mut i = 0;
            while i < m {
                let rows = row_tiles.rows_at(i);
                let (a, c) = (x.add(i * kp + pc), out.add(i * n + j0));
                if rows == MR {
                    gemm_micro::<MR, NV>(kc, a, kp, bp, c, n, cols, first, b, pf(t));
                } else {
                    gemm_micro_tail::<NV>(rows, kc, a, kp, bp, c, n, cols, first, b, pf(t));
                }
                i += rows;
                t += 1;
            }
        }
        pc += kc;
    }
}
