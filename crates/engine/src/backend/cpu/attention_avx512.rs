//! The attention kernel for bf16 KV caches on CPUs with AVX-512 BF16: both products run
//! on `vdpbf16ps`, straight from the cache's bf16 values, with f32 sums and an f32 online
//! softmax. Queries are rounded to bf16 once per task and the softmax weights once per
//! block of keys before they multiply V, as flash-attention does on GPUs.
//!
//! Keys go 16 at a time (one f32 lane each):
//! - scores: the 16 keys' rows are transposed into `kt[p]` = the pair `p` of head dims of
//!   every key, so one `vdpbf16ps` with a broadcast query pair adds two dims of all 16
//!   scores;
//! - values: rows `2j` and `2j + 1` are interleaved into pairs (`vpunpck*wd`, which keeps
//!   the dims of each 128-bit lane together), so one `vdpbf16ps` with a broadcast pair of
//!   weights adds two keys' contributions to 16 dims. The accumulators hold the dims in
//!   that interleaved order (`dim_of`), put back in order when the task writes its rows.
//!
//! Query rows go in tiles of `RT`, sharing every load of `kt` and of the value pairs; each
//! row's arithmetic is the same whatever tile or task it lands in.

// Register tiles are indexed by (row, vector) at once; iterator chains would hide which
// accumulator each multiply-add feeds.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::{AttnArgs, KvData, SharedMut, Task};
use crate::backend::cpu::kernels::avx512::{dp, mask16};

/// Keys per step: one per f32 lane.
const KEYS: usize = 16;
/// Query rows per register tile.
const RT: usize = 4;

/// Head sizes this kernel takes: whole groups of 64 dims (4 accumulators per row), up to
/// 256.
pub(super) fn supports(head_dim: usize) -> bool {
    head_dim.is_multiple_of(64) && head_dim <= 256
}

/// The head dim held by lane `lane` of accumulator vector `x` (see the module doc).
#[inline(always)]
fn dim_of(x: usize, lane: usize) -> usize {
    32 * (x / 2) + 8 * (lane / 4) + 4 * (x % 2) + lane % 4
}

/// SAFETY: the CPU must have AVX-512 F, BW and BF16, both caches must be bf16, and
/// `supports(a.head_dim)` must hold.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn task(a: &AttnArgs<'_>, t: &Task, out: SharedMut, out_cols: usize) {
    let (KvData::Bf16(kc), KvData::Bf16(vc)) = (a.k_cache, a.v_cache) else {
        unreachable!("bf16 attention kernel on an f32 cache")
    };
    let seq = &a.seqs[t.seq];
    let (hd, bs) = (a.head_dim, a.block_size);
    let (hp, zv) = (hd / 2, hd / 32);
    let group = a.num_heads / a.num_kv_heads;
    let rows = (t.q1 - t.q0) * group;
    let (q, pos) = super::scaled_queries(a, t);
    let mut qp = vec![0u32; rows * hp];
    for r in 0..rows {
        for c in 0..zv {
            let src = q.as_ptr().add(r * hd + 32 * c);
            let v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src.add(16)), _mm512_loadu_ps(src));
            _mm512_storeu_si512(qp.as_mut_ptr().add(r * hp + 16 * c).cast(), to_i(v));
        }
    }
    let mut acc = vec![0f32; rows * hd];
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0f32; rows * 16];
    let mut kt = vec![_mm512_setzero_si512(); hp];
    let mut vp = vec![_mm512_setzero_si512(); KEYS / 2 * 2 * zv];
    let last_pos = seq.ctx_len - seq.q_len + t.q1 - 1;
    let num_blocks = (last_pos + 1).div_ceil(bs);
    let block = |b: usize| {
        let base = ((seq.block_table[b] as usize * a.num_kv_heads + t.kv_head) * bs) * hd;
        (base, (seq.ctx_len - b * bs).min(bs))
    };
    for b in 0..num_blocks {
        let (base, valid) = block(b);
        if b + 1 < num_blocks {
            let (next, keys) = block(b + 1);
            prefetch(kc.as_ptr().wrapping_add(next), keys * hd);
            prefetch(vc.as_ptr().wrapping_add(next), keys * hd);
        }
        let mut j0 = 0;
        while j0 < valid {
            let nk = (valid - j0).min(KEYS);
            let key0 = b * bs + j0;
            // Rows are in position order, so those that see none of these keys come first.
            let r0 = pos.partition_point(|&p| p < key0);
            if r0 == rows {
                break;
            }
            let (kp, vptr) = (
                kc.as_ptr().add(base + j0 * hd),
                vc.as_ptr().add(base + j0 * hd),
            );
            load_keys_transposed(kp, nk, hd, &mut kt);
            load_value_pairs(vptr, nk, hd, &mut vp);
            let mut r = r0;
            while r < rows {
                let n = (rows - r).min(RT);
                let tile = Tile {
                    qp: qp.as_ptr().add(r * hp),
                    hp,
                    pos: &pos[r..r + n],
                    key0,
                    nk,
                    m: m.as_mut_ptr().add(r),
                    l: l.as_mut_ptr().add(16 * r),
                    acc: acc.as_mut_ptr().add(r * hd),
                    hd,
                };
                match n {
                    4 => tile.run::<4>(&kt, &vp),
                    3 => tile.run::<3>(&kt, &vp),
                    2 => tile.run::<2>(&kt, &vp),
                    _ => tile.run::<1>(&kt, &vp),
                }
                r += n;
            }
            j0 += nk;
        }
    }
    let unpermute = [unpermute_index(0), unpermute_index(1)];
    for i in 0..t.q1 - t.q0 {
        let tok = seq.q_start + t.q0 + i;
        for g in 0..group {
            let h = t.kv_head * group + g;
            let r = i * group + g;
            // SAFETY: (token row, head h) belongs to this task alone.
            let o = out.slice(tok * out_cols + h * hd, hd);
            let inv = 1.0 / _mm512_reduce_add_ps(_mm512_loadu_ps(l.as_ptr().add(16 * r)));
            let inv = _mm512_set1_ps(inv);
            // Vectors 2c and 2c + 1 hold dims 32c .. 32c + 32 (`dim_of`); put them in order.
            for c in 0..hd / 32 {
                let a = acc.as_ptr().add(r * hd + 32 * c);
                let (v0, v1) = (_mm512_loadu_ps(a), _mm512_loadu_ps(a.add(16)));
                for (half, idx) in unpermute.iter().enumerate() {
                    let v = _mm512_permutex2var_ps(v0, *idx, v1);
                    _mm512_storeu_ps(
                        o.as_mut_ptr().add(32 * c + 16 * half),
                        _mm512_mul_ps(v, inv),
                    );
                }
            }
        }
    }
}

/// For dims `32c + 16·half ..` `+ 16`, their lanes in the accumulator vectors 2c, 2c + 1
/// (numbered 0..32 across the pair, as `permutex2var` takes them): the inverse of `dim_of`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn unpermute_index(half: usize) -> __m512i {
    let mut lane_of = [0i32; 32];
    for x in 0..2 {
        for lane in 0..16 {
            lane_of[dim_of(x, lane)] = (16 * x + lane) as i32;
        }
    }
    _mm512_loadu_si512(lane_of[16 * half..].as_ptr().cast())
}

#[inline(always)]
unsafe fn to_i(v: __m512bh) -> __m512i {
    std::mem::transmute::<__m512bh, __m512i>(v)
}

/// `kt[p]` lane `j` = the `p`-th pair of dims of key `j` (`j < nk`, zero past it), from
/// `nk` rows of `hd` bf16 at `k`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn load_keys_transposed(k: *const u16, nk: usize, hd: usize, kt: &mut [__m512i]) {
    for c in 0..hd / 32 {
        let mut rows = [_mm512_setzero_si512(); 16];
        for (j, row) in rows.iter_mut().enumerate().take(nk) {
            *row = _mm512_loadu_si512(k.add(j * hd + 32 * c).cast());
        }
        let cols = transpose16(rows);
        kt[16 * c..16 * c + 16].copy_from_slice(&cols);
    }
}

/// Transposes a 16 × 16 matrix of 32-bit elements held as 16 row vectors.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
    // Within 128-bit lanes: after two rounds, lane L of u[4g + c] holds element 4L + c of
    // rows 4g..4g + 4.
    let mut t = [_mm512_setzero_si512(); 16];
    for p in 0..8 {
        t[2 * p] = _mm512_unpacklo_epi32(r[2 * p], r[2 * p + 1]);
        t[2 * p + 1] = _mm512_unpackhi_epi32(r[2 * p], r[2 * p + 1]);
    }
    let mut u = [_mm512_setzero_si512(); 16];
    for g in 0..4 {
        let (a, b, c, d) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
        u[4 * g] = _mm512_unpacklo_epi64(a, c);
        u[4 * g + 1] = _mm512_unpackhi_epi64(a, c);
        u[4 * g + 2] = _mm512_unpacklo_epi64(b, d);
        u[4 * g + 3] = _mm512_unpackhi_epi64(b, d);
    }
    // Across 128-bit lanes: column 4L + c gathers lane L of u[c], u[4 + c], u[8 + c],
    // u[12 + c].
    let mut out = [_mm512_setzero_si512(); 16];
    for c in 0..4 {
        let v0 = _mm512_shuffle_i32x4::<0x44>(u[c], u[4 + c]);
        let v1 = _mm512_shuffle_i32x4::<0xEE>(u[c], u[4 + c]);
        let w0 = _mm512_shuffle_i32x4::<0x44>(u[8 + c], u[12 + c]);
        let w1 = _mm512_shuffle_i32x4::<0xEE>(u[8 + c], u[12 + c]);
        out[c] = _mm512_shuffle_i32x4::<0x88>(v0, w0);
        out[4 + c] = _mm512_shuffle_i32x4::<0xDD>(v0, w0);
        out[8 + c] = _mm512_shuffle_i32x4::<0x88>(v1, w1);
        out[12 + c] = _mm512_shuffle_i32x4::<0xDD>(v1, w1);
    }
    out
}

/// `vp[j * 2·zv + x]` = accumulator vector `x`'s dims (`dim_of`) of keys `2j` (low half)
/// and `2j + 1` (high half), for the `nk` rows of `hd` bf16 at `v` (zero past them).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn load_value_pairs(v: *const u16, nk: usize, hd: usize, vp: &mut [__m512i]) {
    let zv = hd / 32;
    let row = |j: usize, c: usize| {
        if j < nk {
            _mm512_loadu_si512(v.add(j * hd + 32 * c).cast())
        } else {
            _mm512_setzero_si512()
        }
    };
    for j in 0..nk.div_ceil(2) {
        for c in 0..zv {
            let (lo, hi) = (row(2 * j, c), row(2 * j + 1, c));
            vp[j * 2 * zv + 2 * c] = _mm512_unpacklo_epi16(lo, hi);
            vp[j * 2 * zv + 2 * c + 1] = _mm512_unpackhi_epi16(lo, hi);
        }
    }
}

/// Up to `RT` consecutive query rows against one step of up to 16 keys.
struct Tile<'a> {
    /// The rows' query pairs, `hp` apart.
    qp: *const u32,
    hp: usize,
    pos: &'a [usize],
    key0: usize,
    nk: usize,
    /// The rows' running maxima, sums (16 lanes each) and accumulators (`hd` each).
    m: *mut f32,
    l: *mut f32,
    acc: *mut f32,
    hd: usize,
}

impl Tile<'_> {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn run<const R: usize>(&self, kt: &[__m512i], vp: &[__m512i]) {
        let hp = self.hp;
        // Scores: two chains per row (even and odd pairs) to cover the latency.
        let mut s = [[_mm512_setzero_ps(); 2]; R];
        let mut p = 0;
        while p < hp {
            for h in 0..2 {
                let k = kt[p + h];
                for i in 0..R {
                    let q = _mm512_set1_epi32(*self.qp.add(i * hp + p + h) as i32);
                    s[i][h] = dp(s[i][h], q, k);
                }
            }
            p += 2;
        }
        let mut corr = [0f32; R];
        // Each row's softmax weights as 8 bf16 pairs (lanes 0..8), kept in registers: the
        // value loop broadcasts from here (a broadcast load of a just-stored vector
        // waits on store forwarding).
        let mut pw = [_mm512_setzero_si512(); R];
        for i in 0..R {
            // Keys this row may see: key0 ≤ pos, so at least the first.
            let seen = (self.pos[i] - self.key0 + 1).min(self.nk);
            let neg = _mm512_set1_ps(f32::NEG_INFINITY);
            let sc = _mm512_mask_blend_ps(mask16(seen), neg, _mm512_add_ps(s[i][0], s[i][1]));
            // The running maximum moves only when some score exceeds it (rarely, once the
            // first blocks are in); until then the correction is exactly 1.
            let m_old = *self.m.add(i);
            let grows = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(sc, _mm512_set1_ps(m_old));
            let m_new = if grows == 0 {
                corr[i] = 1.0;
                m_old
            } else {
                let m_new = _mm512_reduce_max_ps(sc);
                let c = exp_nonpositive(_mm512_set1_ps(m_old - m_new));
                corr[i] = _mm512_cvtss_f32(c);
                m_new
            };
            let e = exp_nonpositive(_mm512_sub_ps(sc, _mm512_set1_ps(m_new)));
            // Sums stay per lane until the task ends.
            let lp = self.l.add(16 * i);
            let lv = _mm512_loadu_ps(lp);
            _mm512_storeu_ps(lp, _mm512_fmadd_ps(lv, _mm512_set1_ps(corr[i]), e));
            *self.m.add(i) = m_new;
            pw[i] = to_i(_mm512_cvtne2ps_pbh(_mm512_setzero_ps(), e));
        }
        // Values, 64 dims (four vectors) per row at a time.
        let (per_key, npairs) = (self.hd / 16, self.nk.div_ceil(2));
        let mut x0 = 0;
        while x0 < per_key {
            let mut va = [[_mm512_setzero_ps(); 4]; R];
            for i in 0..R {
                let cv = _mm512_set1_ps(corr[i]);
                for x in 0..4 {
                    let ap = self.acc.add(i * self.hd + 16 * (x0 + x));
                    va[i][x] = _mm512_loadu_ps(ap);
                    if corr[i] != 1.0 {
                        va[i][x] = _mm512_mul_ps(va[i][x], cv);
                    }
                }
            }
            for j in 0..npairs {
                let v = &vp[j * per_key + x0..j * per_key + x0 + 4];
                let lane = _mm512_set1_epi32(j as i32);
                for i in 0..R {
                    let w = _mm512_permutexvar_epi32(lane, pw[i]);
                    for x in 0..4 {
                        va[i][x] = dp(va[i][x], w, v[x]);
                    }
                }
            }
            for i in 0..R {
                for x in 0..4 {
                    let ap = self.acc.add(i * self.hd + 16 * (x0 + x));
                    _mm512_storeu_ps(ap, va[i][x]);
                }
            }
            x0 += 4;
        }
    }
}

/// `e^x` lane-wise for `x ≤ 0` (−∞ included, giving 0): the same range reduction and
/// polynomial as the AVX2 kernel's `exp_nonpositive`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn exp_nonpositive(x: __m512) -> __m512 {
    use crate::backend::cpu::simd::exp_consts::{LN2_HI, LN2_LO, MIN as LO, POLY};
    let xc = _mm512_max_ps(x, _mm512_set1_ps(LO));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(_mm512_fmadd_ps(
        xc,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
        _mm512_set1_ps(0.5),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), xc);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(POLY[0]);
    for c in &POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    let p = _mm512_add_ps(
        _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
        _mm512_set1_ps(1.0),
    );
    // n is in [-126, 0] after the clamp, so 2^n is a normal number.
    let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvtps_epi32(n),
        _mm512_set1_epi32(127),
    ));
    let scaled = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
    let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(LO));
    _mm512_maskz_mov_ps(keep, scaled)
}

/// Prefetches `len` bf16 values from `p`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn prefetch(p: *const u16, len: usize) {
    let p = p.cast::<u8>();
    let mut off = 0;
    while off < 2 * len {
        // `wrapping_add`: a prefetch of any address is harmless.
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off).cast());
        off += 64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose16_transposes() {
        if !crate::backend::cpu::kernels::has_avx512_bf16() {
            return;
        }
        let m: Vec<u32> = (0..256).collect();
        // SAFETY: AVX-512 BF16 checked above; every load and store is 16 u32 in bounds.
        unsafe {
            let rows: [__m512i; 16] =
                std::array::from_fn(|j| _mm512_loadu_si512(m.as_ptr().add(16 * j).cast()));
            let cols = transpose16(rows);
            for (c, col) in cols.iter().enumerate() {
                let mut got = [0u32; 16];
                _mm512_storeu_si512(got.as_mut_ptr().cast(), *col);
                let want: [u32; 16] = std::array::from_fn(|j| (16 * j + c) as u32);
                assert_eq!(got, want, "column {c}");
            }
        }
    }

    #[test]
    fn value_pairs_hold_the_dims_dim_of_names() {
        if !crate::backend::cpu::kernels::has_avx512_bf16() {
            return;
        }
        let hd = 128;
        // Key j, dim d holds j * 1000 + d (exact in u16 for these sizes).
        let v: Vec<u16> = (0..3)
            .flat_map(|j| (0..hd).map(move |d| (j * 1000 + d) as u16))
            .collect();
        let mut vp = vec![unsafe { _mm512_setzero_si512() }; KEYS / 2 * 2 * (hd / 32)];
        // SAFETY: AVX-512 BF16 checked above; 3 rows of hd values are read.
        unsafe { load_value_pairs(v.as_ptr(), 3, hd, &mut vp) };
        let per_key = hd / 16;
        for j in 0..2 {
            for x in 0..per_key {
                let mut got = [0u32; 16];
                // SAFETY: 16 u32 stored in bounds.
                unsafe { _mm512_storeu_si512(got.as_mut_ptr().cast(), vp[j * per_key + x]) };
                for (lane, &g) in got.iter().enumerate() {
                    let d = dim_of(x, lane) as u32;
                    let lo = 2 * j as u32 * 1000 + d;
                    let hi = if 2 * j + 1 < 3 {
                        (2 * j as u32 + 1) * 1000 + d
                    } else {
                        0
                    };
                    assert_eq!(g, lo | hi << 16, "pair {j}, vector {x}, lane {lane}");
                }
            }
        }
    }
}
