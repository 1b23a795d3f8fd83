//! Paged causal attention on the CPU, block by block with an online softmax (the
//! flash-attention recurrence): each task takes one sequence, one KV head and a chunk of
//! query rows together with every query head that shares the KV head (GQA), and streams the
//! sequence's K/V blocks once through the block table.
//!
//! Every query row is computed the same way whatever else is in the batch or the chunk, so
//! results do not depend on batch composition or prefill chunking.

use super::simd::{self, madd};
use super::{kernels, KvData, SharedMut};
use crate::backend::SeqSlice;

/// Query rows per task during prefill: enough work per task to amortise streaming K/V,
/// small enough that a prompt spreads over the threads.
const Q_CHUNK: usize = 32;

pub(super) struct AttnArgs<'a> {
    pub seqs: &'a [SeqSlice],
    /// Fused q|k|v rows; q heads start at 0.
    pub qkv: &'a [f32],
    pub qkv_cols: usize,
    /// This layer's cache, `[block][kv_head][offset][head_dim]`.
    pub k_cache: &'a KvData,
    pub v_cache: &'a KvData,
    pub block_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

struct Task {
    seq: usize,
    kv_head: usize,
    q0: usize,
    q1: usize,
}

/// Which implementation runs the tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// `task_body` compiled for any CPU.
    Portable,
    /// `task_body` compiled with AVX2 + FMA: head sizes without a dedicated kernel.
    #[cfg(target_arch = "x86_64")]
    Avx2Loops,
    /// The hand-written kernel in `avx2`.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// The bf16 dot-product kernel in `avx512`, for bf16 caches.
    #[cfg(target_arch = "x86_64")]
    Avx512Bf16,
}

impl Kernel {
    fn detect(head_dim: usize, bf16_cache: bool) -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if bf16_cache && kernels::has_avx512_bf16() && avx512::supports(head_dim) {
            return Kernel::Avx512Bf16;
        }
        #[cfg(target_arch = "x86_64")]
        if kernels::has_avx2_fma() {
            return if avx2::supports(head_dim) {
                Kernel::Avx2
            } else {
                Kernel::Avx2Loops
            };
        }
        let _ = (head_dim, bf16_cache);
        Kernel::Portable
    }
}

/// Writes `out[t, h * head_dim ..]` for every token row `t` of every sequence.
pub(super) fn attention(a: &AttnArgs<'_>, out: &mut [f32], out_cols: usize) {
    let bf16_cache = matches!(a.k_cache, KvData::Bf16(_));
    attention_with(Kernel::detect(a.head_dim, bf16_cache), a, out, out_cols);
}

fn attention_with(kernel: Kernel, a: &AttnArgs<'_>, out: &mut [f32], out_cols: usize) {
    let mut tasks = Vec::new();
    for (s, seq) in a.seqs.iter().enumerate() {
        for kv_head in 0..a.num_kv_heads {
            let mut q0 = 0;
            while q0 < seq.q_len {
                let q1 = (q0 + Q_CHUNK).min(seq.q_len);
                tasks.push(Task {
                    seq: s,
                    kv_head,
                    q0,
                    q1,
                });
                q0 = q1;
            }
        }
    }
    let optr = SharedMut(out.as_mut_ptr());
    let run = |i: usize| {
        let t = &tasks[i];
        match kernel {
            Kernel::Portable => task_body::<false>(a, t, optr, out_cols),
            // SAFETY: `Kernel::detect` picks these only on CPUs with AVX2 and FMA, and
            // `Avx2` only for head sizes it supports.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Loops => unsafe { task_avx2(a, t, optr, out_cols) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::task(a, t, optr, out_cols) },
            // SAFETY: `Kernel::detect` picks this only on CPUs with AVX-512 BF16, for bf16
            // caches and head sizes it supports.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16 => unsafe { avx512::task(a, t, optr, out_cols) },
        }
    };
    if tasks.len() == 1 {
        run(0);
    } else {
        kernels::parallel_for(tasks.len(), run);
    }
}

#[cfg(target_arch = "x86_64")]
#[path = "attention_avx512.rs"]
mod avx512;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn task_avx2(a: &AttnArgs<'_>, t: &Task, out: SharedMut, out_cols: usize) {
    task_body::<true>(a, t, out, out_cols)
}

/// A task's queries scaled by 1/√head_dim, as rows `r = i · group + g` (query `t.q0 + i`,
/// head `g` of the task's KV group), and the position each row attends up to.
#[inline(always)]
fn scaled_queries(a: &AttnArgs<'_>, t: &Task) -> (Vec<f32>, Vec<usize>) {
    let seq = &a.seqs[t.seq];
    let hd = a.head_dim;
    let group = a.num_heads / a.num_kv_heads;
    let rows = (t.q1 - t.q0) * group;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut q = vec![0f32; rows * hd];
    let mut pos = vec![0usize; rows];
    let first_pos = seq.ctx_len - seq.q_len;
    for i in 0..t.q1 - t.q0 {
        let row = &a.qkv[(seq.q_start + t.q0 + i) * a.qkv_cols..];
        for g in 0..group {
            let h = t.kv_head * group + g;
            let r = i * group + g;
            for (d, &x) in q[r * hd..(r + 1) * hd]
                .iter_mut()
                .zip(&row[h * hd..(h + 1) * hd])
            {
                *d = x * scale;
            }
            pos[r] = first_pos + t.q0 + i;
        }
    }
    (q, pos)
}

#[inline(always)]
fn task_body<const FMA: bool>(a: &AttnArgs<'_>, t: &Task, out: SharedMut, out_cols: usize) {
    let seq = &a.seqs[t.seq];
    let (hd, bs) = (a.head_dim, a.block_size);
    let group = a.num_heads / a.num_kv_heads;
    let rows = (t.q1 - t.q0) * group;
    let (q, pos) = scaled_queries(a, t);
    let mut acc = vec![0f32; rows * hd];
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0f32; rows];
    let mut s = vec![0f32; bs];
    // bf16 blocks are widened here once per task, then shared by all its rows.
    let mut kbuf = Vec::new();
    let mut vbuf = Vec::new();
    let last_pos = seq.ctx_len - seq.q_len + t.q1 - 1;
    let num_blocks = (last_pos + 1).div_ceil(bs);
    for b in 0..num_blocks {
        let base = ((seq.block_table[b] as usize * a.num_kv_heads + t.kv_head) * bs) * hd;
        let block_start = b * bs;
        let valid = (seq.ctx_len - block_start).min(bs) * hd;
        let kb = widen(a.k_cache, base, valid, &mut kbuf);
        let vb = widen(a.v_cache, base, valid, &mut vbuf);
        for r in 0..rows {
            // Keys this row may see in this block (causal).
            if pos[r] < block_start {
                continue;
            }
            let n = (pos[r] - block_start + 1).min(bs);
            let qr = &q[r * hd..(r + 1) * hd];
            let mut bmax = f32::NEG_INFINITY;
            for (j, sj) in s[..n].iter_mut().enumerate() {
                *sj = simd::dot::<FMA>(qr, &kb[j * hd..(j + 1) * hd]);
                bmax = bmax.max(*sj);
            }
            let m_new = m[r].max(bmax);
            let correction = simd::exp::<FMA>(m[r] - m_new);
            for sj in &mut s[..n] {
                *sj = simd::exp::<FMA>(*sj - m_new);
            }
            let sum: f32 = s[..n].iter().sum();
            l[r] = madd::<FMA>(l[r], correction, sum);
            m[r] = m_new;
            let ar = &mut acc[r * hd..(r + 1) * hd];
            if correction != 1.0 {
                for x in ar.iter_mut() {
                    *x *= correction;
                }
            }
            accumulate_values::<FMA>(&s[..n], vb, hd, ar);
        }
    }
    for i in 0..t.q1 - t.q0 {
        let tok = seq.q_start + t.q0 + i;
        for g in 0..group {
            let h = t.kv_head * group + g;
            let r = i * group + g;
            // SAFETY: (token row, head h) belongs to this task alone.
            let o = unsafe { out.slice(tok * out_cols + h * hd, hd) };
            let inv = 1.0 / l[r];
            for (o, &x) in o.iter_mut().zip(&acc[r * hd..(r + 1) * hd]) {
                *o = x * inv;
            }
        }
    }
}

/// `acc += Σ_j p[j] · v[j]` over rows of `v` of width `hd`. Works in 64-wide slices kept in
/// registers across all keys, so each key costs loads and FMAs but no store of `acc`.
#[inline(always)]
fn accumulate_values<const FMA: bool>(p: &[f32], v: &[f32], hd: usize, acc: &mut [f32]) {
    const W: usize = 64;
    let mut c = 0;
    while c + W <= hd {
        let mut a = [0f32; W];
        a.copy_from_slice(&acc[c..c + W]);
        for (j, &pj) in p.iter().enumerate() {
            let vj: &[f32; W] = v[j * hd + c..j * hd + c + W].try_into().expect("W wide");
            for l in 0..W {
                a[l] = madd::<FMA>(pj, vj[l], a[l]);
            }
        }
        acc[c..c + W].copy_from_slice(&a);
        c += W;
    }
    if c < hd {
        for (j, &pj) in p.iter().enumerate() {
            simd::axpy::<FMA>(pj, &v[j * hd + c..(j + 1) * hd], &mut acc[c..]);
        }
    }
}

/// The f32 values `data[base..base + len]`, borrowed when stored as f32, else widened from
/// bf16 into `buf`.
#[inline(always)]
fn widen<'a>(data: &'a KvData, base: usize, len: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
    match data {
        KvData::F32(d) => &d[base..base + len],
        KvData::Bf16(d) => {
            // Sized first and filled by index, so the loop vectorises.
            buf.resize(len, 0.0);
            for (o, &x) in buf.iter_mut().zip(&d[base..base + len]) {
                *o = f32::from_bits(u32::from(x) << 16);
            }
            buf
        }
    }
}

/// The AVX2 + FMA kernel for the common head sizes (8·`HV` floats, `HV` a power of two up
/// to 16): scores for eight keys at a time with one transposing reduction instead of a
/// horizontal sum per key, the value accumulators of a row held in registers across a
/// block, and the next K/V block prefetched while this one is computed (decode reads
/// the whole cache each step, in 2 KB pieces scattered by the block table, which the
/// hardware prefetcher does not anticipate).
#[cfg(target_arch = "x86_64")]
// Register arrays are indexed by lane and by vector together; iterator chains would hide
// which accumulator each FMA feeds.
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{simd, widen, AttnArgs, KvData, SharedMut, Task};

    pub(super) fn supports(head_dim: usize) -> bool {
        matches!(head_dim, 16 | 32 | 64 | 128)
    }

    /// SAFETY: the CPU must support AVX2 and FMA, and `supports(a.head_dim)` hold.
    pub(super) unsafe fn task(a: &AttnArgs<'_>, t: &Task, out: SharedMut, out_cols: usize) {
        match a.head_dim {
            16 => task_hv::<2>(a, t, out, out_cols),
            32 => task_hv::<4>(a, t, out, out_cols),
            64 => task_hv::<8>(a, t, out, out_cols),
            128 => task_hv::<16>(a, t, out, out_cols),
            hd => unreachable!("no AVX2 attention kernel for head_dim {hd}"),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn task_hv<const HV: usize>(
        a: &AttnArgs<'_>,
        t: &Task,
        out: SharedMut,
        out_cols: usize,
    ) {
        let seq = &a.seqs[t.seq];
        let (hd, bs) = (8 * HV, a.block_size);
        let group = a.num_heads / a.num_kv_heads;
        let rows = (t.q1 - t.q0) * group;
        let (q, pos) = super::scaled_queries(a, t);
        let mut acc = vec![0f32; rows * hd];
        let mut m = vec![f32::NEG_INFINITY; rows];
        let mut l = vec![0f32; rows];
        // Scores are written eight at a time.
        let mut s = vec![0f32; bs.next_multiple_of(8)];
        let mut kbuf = Vec::new();
        let mut vbuf = Vec::new();
        let last_pos = seq.ctx_len - seq.q_len + t.q1 - 1;
        let num_blocks = (last_pos + 1).div_ceil(bs);
        let block = |b: usize| {
            let base = ((seq.block_table[b] as usize * a.num_kv_heads + t.kv_head) * bs) * hd;
            (base, (seq.ctx_len - b * bs).min(bs) * hd)
        };
        for b in 0..num_blocks {
            let (base, valid) = block(b);
            // One block ahead measured best; two to eight blocks, or prefetching to L2
            // only, were slower.
            if b + 1 < num_blocks {
                let (next, len) = block(b + 1);
                prefetch(a.k_cache, next, len);
                prefetch(a.v_cache, next, len);
            }
            let block_start = b * bs;
            let kb = widen(a.k_cache, base, valid, &mut kbuf).as_ptr();
            let vb = widen(a.v_cache, base, valid, &mut vbuf).as_ptr();
            for r in 0..rows {
                // Keys this row may see in this block (causal).
                if pos[r] < block_start {
                    continue;
                }
                let n = (pos[r] - block_start + 1).min(bs);
                scores::<HV>(q.as_ptr().add(r * hd), kb, n, s.as_mut_ptr());
                let (m_new, sum) = softmax_block(s.as_mut_ptr(), n, m[r]);
                let correction = simd::exp::<true>(m[r] - m_new);
                l[r] = l[r].mul_add(correction, sum);
                m[r] = m_new;
                values::<HV>(s.as_ptr(), n, vb, correction, acc.as_mut_ptr().add(r * hd));
            }
        }
        for i in 0..t.q1 - t.q0 {
            let tok = seq.q_start + t.q0 + i;
            for g in 0..group {
                let h = t.kv_head * group + g;
                let r = i * group + g;
                // SAFETY: (token row, head h) belongs to this task alone.
                let o = out.slice(tok * out_cols + h * hd, hd);
                let inv = 1.0 / l[r];
                for (o, &x) in o.iter_mut().zip(&acc[r * hd..(r + 1) * hd]) {
                    *o = x * inv;
                }
            }
        }
    }

    /// `s[j] = q · k[j]` for `j < n` (and junk up to the next multiple of 8), `k` rows of
    /// `8·HV` floats. Eight keys share each load of `q`; their eight accumulators are
    /// reduced together into one vector.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn scores<const HV: usize>(q: *const f32, k: *const f32, n: usize, s: *mut f32) {
        let hd = 8 * HV;
        let mut j = 0;
        while j < n {
            // Past the last key, lanes repeat it: in bounds, and masked off afterwards.
            let kp: [*const f32; 8] = if j + 8 <= n {
                std::array::from_fn(|t| k.add((j + t) * hd))
            } else {
                std::array::from_fn(|t| k.add((j + t).min(n - 1) * hd))
            };
            let mut acc = [_mm256_setzero_ps(); 8];
            for v in 0..HV {
                let qv = _mm256_loadu_ps(q.add(8 * v));
                for t in 0..8 {
                    acc[t] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp[t].add(8 * v)), acc[t]);
                }
            }
            _mm256_storeu_ps(s.add(j), sum8(acc));
            j += 8;
        }
    }

    /// One block's step of the online softmax for one row: with `s[..n]` the scores (in
    /// groups of eight, junk past `n`), returns the new running maximum `max(m, s[..n])`
    /// and `Σ exp(s[j] - max)`, and leaves `exp(s[j] - max)` in `s[..n]` (zeros past it).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn softmax_block(s: *mut f32, n: usize, m: f32) -> (f32, f32) {
        let groups = n.div_ceil(8);
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let neg = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut vmax = neg;
        for g in 0..groups {
            let p = s.add(8 * g);
            let mut v = _mm256_loadu_ps(p);
            let left = n - 8 * g;
            if left < 8 {
                let keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(left as i32), lanes);
                v = _mm256_blendv_ps(neg, v, _mm256_castsi256_ps(keep));
                _mm256_storeu_ps(p, v);
            }
            vmax = _mm256_max_ps(vmax, v);
        }
        let h = _mm_max_ps(
            _mm256_castps256_ps128(vmax),
            _mm256_extractf128_ps::<1>(vmax),
        );
        let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_max_ss(h, _mm_movehdup_ps(h));
        let m_new = m.max(_mm_cvtss_f32(h));
        let mv = _mm256_set1_ps(m_new);
        let mut vsum = _mm256_setzero_ps();
        for g in 0..groups {
            let p = s.add(8 * g);
            let e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p), mv));
            _mm256_storeu_ps(p, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        let h = _mm_add_ps(
            _mm256_castps256_ps128(vsum),
            _mm256_extractf128_ps::<1>(vsum),
        );
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_movehdup_ps(h));
        (m_new, _mm_cvtss_f32(h))
    }

    /// `e^x` lane-wise for `x ≤ 0` (−∞ included, giving 0): the range reduction and
    /// polynomial of `simd::exp`, without the overflow and NaN handling that positive
    /// or NaN inputs would need.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp_nonpositive(x: __m256) -> __m256 {
        use super::simd::exp_consts::{LN2_HI, LN2_LO, MIN as LO, POLY};
        let xc = _mm256_max_ps(x, _mm256_set1_ps(LO));
        let n = _mm256_floor_ps(_mm256_fmadd_ps(
            xc,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), xc);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(POLY[0]);
        for c in &POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let p = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        // n is in [-126, 0] after the clamp, so 2^n is a normal number.
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        let scaled = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
        let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(LO));
        _mm256_and_ps(scaled, keep)
    }

    /// Lane t of the result is the sum of the lanes of `v[t]`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum8(v: [__m256; 8]) -> __m256 {
        // Pairwise adds within 128-bit halves: after two rounds, half h of `u0` holds
        // the partial sums of v[0..4] over their half h, and `u1` those of v[4..8].
        let t0 = _mm256_hadd_ps(v[0], v[1]);
        let t1 = _mm256_hadd_ps(v[2], v[3]);
        let t2 = _mm256_hadd_ps(v[4], v[5]);
        let t3 = _mm256_hadd_ps(v[6], v[7]);
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        let lo = _mm256_permute2f128_ps::<0x20>(u0, u1);
        let hi = _mm256_permute2f128_ps::<0x31>(u0, u1);
        _mm256_add_ps(lo, hi)
    }

    /// `acc = acc · correction + Σ_{j<n} p[j] · v[j]`, `v` rows of `8·HV` floats; up to
    /// 64 accumulator floats stay in registers for all `n` keys.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn values<const HV: usize>(
        p: *const f32,
        n: usize,
        v: *const f32,
        correction: f32,
        acc: *mut f32,
    ) {
        let hd = 8 * HV;
        let corr = _mm256_set1_ps(correction);
        let mut c = 0;
        while c < HV {
            let w = (HV - c).min(8);
            let mut r = [_mm256_setzero_ps(); 8];
            for x in 0..w {
                r[x] = _mm256_mul_ps(_mm256_loadu_ps(acc.add(8 * (c + x))), corr);
            }
            for j in 0..n {
                let pj = _mm256_broadcast_ss(&*p.add(j));
                let vr = v.add(j * hd + 8 * c);
                for x in 0..w {
                    r[x] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vr.add(8 * x)), r[x]);
                }
            }
            for x in 0..w {
                _mm256_storeu_ps(acc.add(8 * (c + x)), r[x]);
            }
            c += 8;
        }
    }

    /// Prefetches `len` values of `data` from `base`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn prefetch(data: &KvData, base: usize, len: usize) {
        let (p, bytes) = match data {
            KvData::F32(d) => (d.as_ptr().wrapping_add(base).cast::<u8>(), len * 4),
            KvData::Bf16(d) => (d.as_ptr().wrapping_add(base).cast::<u8>(), len * 2),
        };
        let mut off = 0;
        while off < bytes {
            // `wrapping_add`: a prefetch of any address is harmless.
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off).cast());
            off += 64;
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn exp_nonpositive_matches_std() {
            if !crate::backend::cpu::kernels::has_avx2_fma() {
                return;
            }
            let mut worst = 0f32;
            let mut x = -100.0f32;
            while x <= 0.0 {
                let xs: [f32; 8] = std::array::from_fn(|i| x + i as f32 * 1e-3);
                let mut got = [0f32; 8];
                // SAFETY: AVX2 and FMA checked above.
                unsafe {
                    _mm256_storeu_ps(
                        got.as_mut_ptr(),
                        exp_nonpositive(_mm256_loadu_ps(xs.as_ptr())),
                    )
                };
                for (g, x) in got.iter().zip(xs) {
                    let want = if x < -87.336_55 { 0.0 } else { x.exp() };
                    if want > f32::MIN_POSITIVE {
                        worst = worst.max(((g - want) / want).abs());
                    } else {
                        assert!(*g <= f32::MIN_POSITIVE * 2.0, "exp({x}) = {g}");
                    }
                }
                x += 0.0173;
            }
            assert!(worst < 4e-7, "relative error {worst}");
            let mut got = [1f32; 8];
            // SAFETY: as above.
            unsafe {
                _mm256_storeu_ps(
                    got.as_mut_ptr(),
                    exp_nonpositive(_mm256_set1_ps(f32::NEG_INFINITY)),
                )
            };
            assert_eq!(got, [0.0; 8]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::backend::cpu::kernels::test_fill as fill;

    const HEADS: usize = 4;
    const KV_HEADS: usize = 2;

    /// A batch of `(q_len, ctx_len)` sequences over a shared cache whose blocks are handed
    /// out in a scrambled order, with random values everywhere (stale slots included).
    struct Batch {
        seqs: Vec<SeqSlice>,
        qkv: Vec<f32>,
        k: KvData,
        v: KvData,
        hd: usize,
        bs: usize,
    }

    impl Batch {
        fn new(shape: &[(usize, usize)], hd: usize, bs: usize, bf16: bool, seed: u64) -> Batch {
            let blocks: usize = shape.iter().map(|&(_, c)| c.div_ceil(bs)).sum();
            // Every block id exactly once: 7 is coprime with `blocks` unless it divides it.
            let step = if blocks.is_multiple_of(7) { 1 } else { 7 };
            let mut ids = (0..blocks).map(|i| (i * step % blocks) as u32);
            let mut seqs = Vec::new();
            let mut q_start = 0;
            for &(q_len, ctx_len) in shape {
                let block_table = (0..ctx_len.div_ceil(bs))
                    .map(|_| ids.next().unwrap())
                    .collect();
                seqs.push(SeqSlice {
                    q_start,
                    q_len,
                    ctx_len,
                    block_table,
                });
                q_start += q_len;
            }
            let cols = (HEADS + 2 * KV_HEADS) * hd;
            let qkv = fill(q_start * cols, seed);
            let cache_len = blocks * KV_HEADS * bs * hd;
            let kv = |seed| {
                let v = fill(cache_len, seed);
                if bf16 {
                    KvData::Bf16(
                        v.iter()
                            .map(|&x| half::bf16::from_f32(x).to_bits())
                            .collect(),
                    )
                } else {
                    KvData::F32(v)
                }
            };
            Batch {
                seqs,
                qkv,
                k: kv(seed + 1),
                v: kv(seed + 2),
                hd,
                bs,
            }
        }

        fn run(&self, kernel: Kernel, seqs: &[SeqSlice]) -> Vec<f32> {
            let args = AttnArgs {
                seqs,
                qkv: &self.qkv,
                qkv_cols: (HEADS + 2 * KV_HEADS) * self.hd,
                k_cache: &self.k,
                v_cache: &self.v,
                block_size: self.bs,
                num_heads: HEADS,
                num_kv_heads: KV_HEADS,
                head_dim: self.hd,
            };
            let rows = self.seqs.iter().map(|s| s.q_len).sum::<usize>();
            let cols = HEADS * self.hd;
            let mut out = vec![f32::NAN; rows * cols];
            attention_with(kernel, &args, &mut out, cols);
            out
        }
    }

    const SHAPE: [(usize, usize); 6] = [(1, 1), (1, 37), (7, 40), (20, 20), (1, 16), (33, 70)];

    /// The kernels this CPU can run for `hd` and the cache type, besides `Portable`.
    fn fast_kernels(hd: usize, bf16: bool) -> Vec<Kernel> {
        let mut v = vec![Kernel::detect(hd, false)];
        if Kernel::detect(hd, bf16) != v[0] {
            v.push(Kernel::detect(hd, bf16));
        }
        v.retain(|&k| k != Kernel::Portable);
        v
    }

    /// How far a kernel may be from the f32 loops: rounding-level for the f32 kernels; for
    /// the bf16 one, which rounds queries and softmax weights to bf16 (8 bits), about
    /// 2⁻⁸ of the values' magnitude (1 here).
    fn tolerance(kernel: Kernel) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Avx512Bf16 {
            return 4e-3;
        }
        let _ = kernel;
        2e-6
    }

    #[test]
    fn fast_kernels_match_portable_loops() {
        for hd in [16, 24, 32, 64, 128] {
            for bs in [16, 12, 5, 40] {
                for bf16 in [false, true] {
                    let b = Batch::new(&SHAPE, hd, bs, bf16, hd as u64 + bs as u64);
                    let want = b.run(Kernel::Portable, &b.seqs);
                    for kernel in fast_kernels(hd, bf16) {
                        let got = b.run(kernel, &b.seqs);
                        let tol = tolerance(kernel);
                        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (g - w).abs() <= tol,
                                "{kernel:?} hd={hd} bs={bs} bf16={bf16} [{i}]: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_sequence_gives_the_same_bits_alone_and_in_a_batch() {
        for hd in [16, 64, 128] {
            let b = Batch::new(&SHAPE, hd, 16, true, 5);
            for kernel in fast_kernels(hd, true) {
                let together = b.run(kernel, &b.seqs);
                let cols = HEADS * hd;
                for s in &b.seqs {
                    let alone = b.run(kernel, std::slice::from_ref(s));
                    let rows = s.q_start * cols..(s.q_start + s.q_len) * cols;
                    assert_eq!(
                        alone[rows.clone()],
                        together[rows],
                        "{kernel:?} hd={hd} seq at {}",
                        s.q_start
                    );
                }
            }
        }
    }

    #[test]
    fn a_prompt_gives_the_same_bits_whole_and_in_chunks() {
        // Rows 0..33 of a 70-token context at once, then as chunks of 20 and 13 (the
        // second one seeing more of the cache), as chunked prefill runs them.
        for hd in [64, 128] {
            for bf16 in [false, true] {
                let b = Batch::new(&[(33, 70)], hd, 16, bf16, 9);
                let whole = &b.seqs[0];
                let chunk = |q_start: usize, q_len: usize, ctx_len: usize| SeqSlice {
                    q_start,
                    q_len,
                    ctx_len,
                    block_table: whole.block_table.clone(),
                };
                let cols = HEADS * hd;
                for kernel in fast_kernels(hd, bf16) {
                    let want = b.run(kernel, &b.seqs);
                    let first = b.run(kernel, &[chunk(0, 20, 57)]);
                    let second = b.run(kernel, &[chunk(20, 13, 70)]);
                    let split = 20 * cols;
                    assert_eq!(
                        first[..split],
                        want[..split],
                        "{kernel:?} hd={hd} bf16={bf16}"
                    );
                    assert_eq!(
                        second[split..],
                        want[split..],
                        "{kernel:?} hd={hd} bf16={bf16}"
                    );
                }
            }
        }
    }
}
