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
const Q_CHUNK: usize = 16;

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

/// Writes `out[t, h * head_dim ..]` for every token row `t` of every sequence.
pub(super) fn attention(a: &AttnArgs<'_>, out: &mut [f32], out_cols: usize) {
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
        #[cfg(target_arch = "x86_64")]
        if kernels::has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            unsafe { task_avx2(a, t, optr, out_cols) };
            return;
        }
        task_body::<false>(a, t, optr, out_cols);
    };
    if tasks.len() == 1 {
        run(0);
    } else {
        kernels::parallel_for(tasks.len(), run);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn task_avx2(a: &AttnArgs<'_>, t: &Task, out: SharedMut, out_cols: usize) {
    task_body::<true>(a, t, out, out_cols)
}

#[inline(always)]
fn task_body<const FMA: bool>(a: &AttnArgs<'_>, t: &Task, out: SharedMut, out_cols: usize) {
    let seq = &a.seqs[t.seq];
    let (hd, bs) = (a.head_dim, a.block_size);
    let group = a.num_heads / a.num_kv_heads;
    let rows = (t.q1 - t.q0) * group;
    let scale = 1.0 / (hd as f32).sqrt();
    // Row r = (query i, head g within the group).
    let mut q = vec![0f32; rows * hd];
    let mut acc = vec![0f32; rows * hd];
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0f32; rows];
    let mut pos = vec![0usize; rows];
    let mut s = vec![0f32; bs];
    // bf16 blocks are widened here once per task, then shared by all its rows.
    let mut kbuf = Vec::new();
    let mut vbuf = Vec::new();
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
    let last_pos = first_pos + t.q1 - 1;
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
