//! `out = x · Wᵀ (+ bias)`: shape checks, choice of kernel, and the split across the pool.
//!
//! Two regimes, switched on the number of activation rows `m`:
//! - `m ≤ GEMV_MAX_M` (decode): every weight is used by few rows, so the weights are
//!   streamed once, in contiguous row chunks per thread, and the kernel only has to keep up
//!   with DRAM.
//! - larger `m` (batched decode, prefill): every weight is used by many rows, so FMA
//!   throughput is the limit; the BLIS-style kernel sweeps blocks of activation rows over
//!   weight panels packed once per matrix, on the first such call (kept in the
//!   [`Matrix`]). Threads split the panels, and for long inputs the row blocks as well.
//!
//! The scalar path mirrors the same split and is what runs on CPUs without AVX2/FMA. On
//! CPUs with AVX-512 BF16, bf16 weights take a third path (`matmul_bf16_dot`): activations
//! rounded to bf16 and one packed GEMM on `vdpbf16ps` for every `m`.

use super::matrix::{bf16_to_f32, f16_to_f32, Matrix, WeightData};
use super::pool::{num_threads, parallel_for};
use super::Isa;

/// Up to this many activation rows the GEMV kernel is used, above it the packed GEMM.
/// Measured crossover on Zen 3 (bf16, one thread): GEMV 61 vs GEMM 41 GFLOP/s at m = 8,
/// 60 vs 52 at m = 12, level at m = 16, and GEMM ahead from there (75 vs 58 at m = 24).
const GEMV_MAX_M: usize = 12;
/// Below this many multiply-adds a call runs on the calling thread: the work is shorter
/// than waking a worker.
const SERIAL_WORK: usize = 1 << 15;
/// Chunks per thread. More than one lets the other threads take over the share of a
/// thread whose core is busy with something else (on a 2-core server, often); chunks stay
/// large enough (≥ 64 weight rows here) that streaming is unaffected.
const CHUNKS_PER_THREAD: usize = 4;
/// `k` block of the GEMM path. 512 covers the model's `k = 512` in one pass (no partial
/// sums written back). On one Zen 3 thread, bf16 model shapes: 83 vs 79 GFLOP/s for 256 at
/// m = 32, 93 vs 81 at m = 2048.
const GEMM_KC: usize = 512;
/// Activation rows per GEMM row block: 96 × `GEMM_KC` f32 is 192 KB, which stays in L2
/// while the panels of a thread's share pass over it. At m = 2048 (a prefill step) on one
/// thread: 93 GFLOP/s, against 69 with no row blocks and 87–88 with 48 or 192 rows. The
/// AVX-512 BF16 path uses it too (48 KB of bf16 pairs per `BF16_KC_PAIRS` block): on two
/// Zen 4 threads 48, 192 and 384 rows were no faster at m = 512 or 2,048.
const GEMM_MC: usize = 96;
/// GEMM register tile: `GEMM_MR` activation rows × `8·GEMM_NV` weight rows, 6 × 16 =
/// 12 accumulators + 2 weight vectors + 1 broadcast = 15 of AVX2's 16 registers. (4 × 24
/// needs all 16, and LLVM then spills an accumulator every iteration: measured 2× slower.)
const GEMM_MR: usize = 6;
const GEMM_NV: usize = 2;
/// The AVX-512 BF16 GEMM's register tile: `BF16_MR` rows × `16·BF16_NV` weight rows, 24
/// accumulators + 4 weight vectors of the 32 zmm registers (activation pairs are
/// broadcast from memory).
const BF16_MR: usize = 6;
const BF16_NV: usize = 4;
const BF16_NR: usize = 16 * BF16_NV;
/// `k` block of the BF16 GEMM, in pairs: 128 pairs × 64 weight rows × 4 bytes = 32 KB of
/// panel per block. 64 and 256 measured the same within noise on Zen 4 (m = 32 and 512).
const BF16_KC_PAIRS: usize = 128;

/// The output pointer shared by the threads of one call. Each thread writes only the
/// output columns of the weight rows it owns, so the writes are disjoint.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: used only to write disjoint column ranges of one output buffer that outlives the
// `parallel_for` call (see `run_chunks`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    // A method rather than `.0` so closures capture the whole `Sync` wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `out[m × w.rows] = x[m × w.cols] · Wᵀ (+ bias[w.rows])`, multi-threaded over the kernel
/// pool. Panics if the slice lengths do not match the shapes.
pub fn matmul(x: &[f32], m: usize, w: &Matrix, bias: Option<&[f32]>, out: &mut [f32]) {
    matmul_with(Isa::detect(), x, m, w, bias, out);
}

pub(super) fn matmul_with(
    isa: Isa,
    x: &[f32],
    m: usize,
    w: &Matrix,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m * k, "matmul: x is not {m} x {k}");
    assert_eq!(out.len(), m * n, "matmul: out is not {m} x {n}");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "matmul: bias length is not {n}");
    }
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for row in out.chunks_exact_mut(n) {
            match bias {
                Some(b) => row.copy_from_slice(b),
                None => row.fill(0.0),
            }
        }
        return;
    }
    // A packed-only matrix has no row-major copy for the other paths to read.
    assert!(
        !w.packed_only || isa == Isa::detect(),
        "matmul: these weights were packed for the {} kernels only",
        Isa::detect().name()
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 if matches!(w.data, WeightData::Bf16(_)) => {
            let WeightData::Bf16(d) = &w.data else {
                unreachable!()
            };
            x86::matmul_bf16_dot(d, w, x, m, bias, out)
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Bf16 => match &w.data {
            WeightData::F32(d) => x86::matmul::<super::avx2::F32>(d, w, x, m, bias, out),
            WeightData::Bf16(d) => x86::matmul::<super::avx2::Bf16>(d, w, x, m, bias, out),
            WeightData::F16(d) => x86::matmul::<super::avx2::F16>(d, w, x, m, bias, out),
        },
        Isa::Scalar => match &w.data {
            WeightData::F32(d) => scalar_matmul(d, |v| v, x, m, k, n, bias, out),
            WeightData::Bf16(d) => scalar_matmul(d, bf16_to_f32, x, m, k, n, bias, out),
            WeightData::F16(d) => scalar_matmul(d, f16_to_f32, x, m, k, n, bias, out),
        },
    }
}

/// `data` (bf16, `n` rows of `k`) packed into the AVX-512 BF16 GEMM's panels, on the
/// kernel pool, each task packing whole panels.
#[cfg(target_arch = "x86_64")]
pub(super) fn pack_bf16_pairs(data: &[u16], k: usize, n: usize) -> Vec<u32> {
    let (kp, panels) = (k.div_ceil(2), n.div_ceil(BF16_NR));
    let mut buf = vec![0u32; panels * BF16_NR * kp];
    let per_panel = BF16_NR * kp;
    let dst = x86::PairsPtr(buf.as_mut_ptr());
    run_chunks(panels, n * k / 4, |p0, p1| {
        let rows = (p0 * BF16_NR, (p1 * BF16_NR).min(n));
        // SAFETY: panels p0..p1 are this task's alone, inside `buf`.
        let out = unsafe {
            std::slice::from_raw_parts_mut(dst.get().add(p0 * per_panel), (p1 - p0) * per_panel)
        };
        super::avx512::pack_pair_panels::<BF16_NV>(
            &data[rows.0 * k..rows.1 * k],
            k,
            rows.1 - rows.0,
            out,
        );
    });
    buf
}

/// Row `r` of a matrix with `k` columns, widened from the panels `pack_bf16_pairs` made.
#[cfg(target_arch = "x86_64")]
pub(super) fn bf16_pairs_row(pairs: &[u32], k: usize, r: usize, out: &mut [f32]) {
    let (kp, p, j) = (k.div_ceil(2), r / BF16_NR, r % BF16_NR);
    for (c, o) in out.iter_mut().enumerate().take(k) {
        let u = pairs[(p * kp + c / 2) * BF16_NR + j];
        *o = bf16_to_f32((u >> (16 * (c % 2))) as u16);
    }
}

/// Splits `units` into contiguous chunks and runs `f(start, end)` for each, on the pool
/// unless the call is too small to be worth a dispatch.
fn run_chunks(units: usize, work: usize, f: impl Fn(usize, usize) + Sync) {
    let chunks = if work < SERIAL_WORK {
        1
    } else {
        (num_threads() * CHUNKS_PER_THREAD).min(units)
    };
    if chunks <= 1 {
        f(0, units);
        return;
    }
    parallel_for(chunks, |c| f(units * c / chunks, units * (c + 1) / chunks));
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::avx2::{gemm_packed, gemv_rows, pack_panels, Widen};
    use super::super::avx512;
    use super::*;

    /// Rows per GEMV scheduling unit, so chunk edges fall on whole register tiles.
    const GEMV_UNIT: usize = 8;
    /// Weight rows per packed panel.
    const NR: usize = 8 * GEMM_NV;

    /// `data` is `w`'s weights as stored.
    pub(super) fn matmul<W: Widen>(
        data: &[W::Raw],
        w: &Matrix,
        x: &[f32],
        m: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let (n, k) = (w.rows, w.cols);
        let op = OutPtr(out.as_mut_ptr());
        let bp = || bias.map_or(std::ptr::null(), <[f32]>::as_ptr);
        let work = m * n * k;
        // SAFETY (all calls below): `Isa::Avx2` is only chosen when the CPU has AVX2, FMA
        // and F16C; the lengths were checked against (m, k, n) by `matmul_with`, and each
        // task touches weight rows / output columns inside its own range.
        if m <= GEMV_MAX_M {
            let units = n.div_ceil(GEMV_UNIT);
            run_chunks(units, work, |u0, u1| {
                let rows = (u0 * GEMV_UNIT, (u1 * GEMV_UNIT).min(n));
                let (wp, xp) = (data.as_ptr(), x.as_ptr());
                unsafe { gemv_rows::<W>(wp, xp, m, k, n, bp(), op.get(), rows) };
            });
            return;
        }
        let packed = W::unwrap(w.panels.packed.get_or_init(|| pack::<W>(data, k, n)));
        let task_grid = grid(m, GEMM_MR, n.div_ceil(NR));
        let task = |u: usize| {
            let ((m0, m1), (p0, p1)) = task_grid.task(u);
            unsafe {
                gemm_packed::<W, GEMM_MR, GEMM_NV>(
                    packed.as_ptr(),
                    x.as_ptr().add(m0 * k),
                    m1 - m0,
                    k,
                    n,
                    bp(),
                    op.get().add(m0 * n),
                    (p0, p1),
                    GEMM_KC,
                );
            }
        };
        if work < SERIAL_WORK {
            (0..task_grid.tasks()).for_each(task);
        } else {
            parallel_for(task_grid.tasks(), task);
        }
    }

    /// How a GEMM call is cut into tasks: row blocks of about `GEMM_MC` rows, whole tiles
    /// of `mr` rows shared out evenly among them, and the panels of each block split into
    /// enough groups to keep every thread busy.
    struct Grid {
        m: usize,
        mr: usize,
        /// Whole `mr`-row tiles, the last one possibly short.
        tiles: usize,
        m_blocks: usize,
        panels: usize,
        groups: usize,
    }

    fn grid(m: usize, mr: usize, panels: usize) -> Grid {
        let tiles = m.div_ceil(mr);
        let m_blocks = m.div_ceil(GEMM_MC);
        let want = num_threads() * CHUNKS_PER_THREAD;
        let groups = want.div_ceil(m_blocks).min(panels);
        Grid {
            m,
            mr,
            tiles,
            m_blocks,
            panels,
            groups,
        }
    }

    impl Grid {
        fn tasks(&self) -> usize {
            self.m_blocks * self.groups
        }

        /// Task `u`'s activation rows and panels.
        fn task(&self, u: usize) -> ((usize, usize), (usize, usize)) {
            let (mb, g) = (u / self.groups, u % self.groups);
            // Whole tiles shared out evenly, so no row block is much shorter than the
            // others (a short last block left one thread idle at the end of every call).
            let tile = |b: usize| (self.tiles * b / self.m_blocks * self.mr).min(self.m);
            let rows = (tile(mb), tile(mb + 1));
            let p = self.panels;
            (rows, (p * g / self.groups, p * (g + 1) / self.groups))
        }
    }

    /// `matmul` for bf16 weights on the AVX-512 BF16 path: the activations are rounded to
    /// bf16 pairs (into a buffer kept per thread), then the packed GEMM runs for every `m`.
    ///
    /// No GEMV regime here: at m = 1 the packed panels, read front to back, stream from
    /// DRAM at least as fast as the row-major weights (a row-wise `vdpbf16ps` GEMV measured
    /// 5–20% slower), and from m = 2 on the GEMM is well ahead (a whole m = 8 decode step
    /// on two Zen 4 threads: 2.4 ms against 3.0–3.6 ms). It also makes a row's result
    /// independent of the batch it comes in.
    pub(super) fn matmul_bf16_dot(
        data: &[u16],
        w: &Matrix,
        x: &[f32],
        m: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        thread_local! {
            static PAIRS: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
        }
        let (n, k) = (w.rows, w.cols);
        let kp = k.div_ceil(2);
        // Taken out rather than borrowed, so a nested call (none today) gets its own.
        let mut pairs = PAIRS.take();
        pairs.clear();
        pairs.resize(m * kp, 0);
        let pp = PairsPtr(pairs.as_mut_ptr());
        // SAFETY (both calls below): `Isa::Avx512Bf16` is only chosen when the CPU has
        // AVX-512 F, BW and BF16; the lengths were checked against (m, k, n) by
        // `matmul_with`, `pairs` holds m × kp, the panels cover n.div_ceil(NR) panels of
        // kp pairs, and each task writes only its own rows of `pairs` or its own output
        // columns.
        run_chunks(m, m * k / 8, |r0, r1| unsafe {
            avx512::round_to_bf16_pairs(x.as_ptr(), k, pp.get(), (r0, r1));
        });
        let packed = w
            .panels
            .bf16_pairs
            .get_or_init(|| pack_bf16_pairs(data, k, n));
        let op = OutPtr(out.as_mut_ptr());
        let bp = || bias.map_or(std::ptr::null(), <[f32]>::as_ptr);
        let xs: &[u32] = &pairs;
        let task_grid = grid(m, BF16_MR, n.div_ceil(BF16_NR));
        let task = |u: usize| {
            let ((m0, m1), (p0, p1)) = task_grid.task(u);
            unsafe {
                avx512::gemm_packed::<BF16_MR, BF16_NV>(
                    packed.as_ptr(),
                    xs.as_ptr().add(m0 * kp),
                    m1 - m0,
                    kp,
                    n,
                    bp(),
                    op.get().add(m0 * n),
                    (p0, p1),
                    BF16_KC_PAIRS,
                );
            }
        };
        if m * n * k < SERIAL_WORK {
            (0..task_grid.tasks()).for_each(task);
        } else {
            parallel_for(task_grid.tasks(), task);
        }
        PAIRS.set(pairs);
    }

    /// A `u32` buffer shared by tasks that each write their own part of it.
    #[derive(Clone, Copy)]
    pub(super) struct PairsPtr(pub(super) *mut u32);
    // SAFETY: see `OutPtr`; the rows written are disjoint and `pairs` outlives the call.
    unsafe impl Send for PairsPtr {}
    unsafe impl Sync for PairsPtr {}
    impl PairsPtr {
        pub(super) fn get(self) -> *mut u32 {
            self.0
        }
    }

    /// The weights as panels of `NR` rows, each `[k][NR]` (the GEMM micro-kernel's
    /// layout), in their own element type. Runs on the calling thread: this may be called
    /// with the pool busy.
    fn pack<W: Widen>(data: &[W::Raw], k: usize, n: usize) -> WeightData {
        let mut buf = vec![W::Raw::default(); n.div_ceil(NR) * NR * k];
        pack_panels::<W, GEMM_NV>(data, k, n, &mut buf);
        W::wrap(buf)
    }
}

/// Portable path: widen one weight row at a time, then plain dot products written with
/// eight partial sums so the compiler can vectorise them for whatever the target has.
#[allow(clippy::too_many_arguments)]
fn scalar_matmul<T: Copy + Sync>(
    w: &[T],
    widen: impl Fn(T) -> f32 + Sync,
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let op = OutPtr(out.as_mut_ptr());
    run_chunks(n, m * n * k, |r0, r1| {
        let mut row = vec![0.0f32; k];
        for r in r0..r1 {
            for (d, &s) in row.iter_mut().zip(&w[r * k..(r + 1) * k]) {
                *d = widen(s);
            }
            let b = bias.map_or(0.0, |b| b[r]);
            for i in 0..m {
                let v = scalar_dot(&row, &x[i * k..(i + 1) * k]) + b;
                // SAFETY: `i * n + r < m * n`, and column `r` belongs to this chunk alone.
                unsafe { *op.get().add(i * n + r) = v };
            }
        }
    });
}

pub(super) fn scalar_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::backend::cpu::kernels::test_fill as fill;

    fn matrix(dtype: &str, n: usize, k: usize, seed: u64) -> Matrix {
        let v = fill(n * k, seed);
        match dtype {
            "f32" => Matrix::from_f32(n, k, v),
            "bf16" => Matrix::from_bf16_bits(
                n,
                k,
                v.iter()
                    .map(|x| half::bf16::from_f32(*x).to_bits())
                    .collect(),
            ),
            _ => Matrix::from_f16_bits(
                n,
                k,
                v.iter()
                    .map(|x| half::f16::from_f32(*x).to_bits())
                    .collect(),
            ),
        }
    }

    /// Whether `isa` rounds the activations of a matmul over `w` to bf16.
    fn rounds_x(isa: Isa, w: &Matrix) -> bool {
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512Bf16 {
            return matches!(w.data, WeightData::Bf16(_));
        }
        let _ = (isa, w);
        false
    }

    /// f64 reference for `isa` (which may round `x` to bf16 first), plus the sum of
    /// |products| per output as the error scale.
    fn reference(
        isa: Isa,
        x: &[f32],
        m: usize,
        w: &Matrix,
        bias: Option<&[f32]>,
    ) -> (Vec<f64>, Vec<f64>) {
        let rounded: Vec<f32>;
        let x = if rounds_x(isa, w) {
            rounded = x
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect();
            &rounded
        } else {
            x
        };
        let (n, k) = (w.rows, w.cols);
        let mut row = vec![0.0f32; k];
        let mut out = vec![0.0; m * n];
        let mut mag = vec![0.0; m * n];
        for r in 0..n {
            w.row_f32(r, &mut row);
            for i in 0..m {
                let (mut s, mut a) = (0.0f64, 0.0f64);
                for t in 0..k {
                    let p = f64::from(x[i * k + t]) * f64::from(row[t]);
                    s += p;
                    a += p.abs();
                }
                let b = bias.map_or(0.0, |b| f64::from(b[r]));
                out[i * n + r] = s + b;
                mag[i * n + r] = a + b.abs();
            }
        }
        (out, mag)
    }

    /// Every path this CPU can run, the portable one first.
    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        if Isa::detect() == Isa::Avx512Bf16 {
            v.push(Isa::Avx2);
        }
        if Isa::detect() != Isa::Scalar {
            v.push(Isa::detect());
        }
        v
    }

    /// The paths other than the portable one.
    fn fast_isas() -> Vec<Isa> {
        isas().into_iter().skip(1).collect()
    }

    #[test]
    fn matches_f64_reference_on_odd_shapes() {
        let shapes = [
            (1, 13, 37),
            (3, 13, 37),
            (7, 13, 37),
            (33, 13, 37),
            (1, 1, 1),
            (2, 5, 8),
            (5, 24, 16),
            (4, 25, 7),
            (9, 50, 129),
            (33, 70, 300),
            (6, 64, 600),
            (1, 100, 1000),
            (GEMV_MAX_M, 40, 64),
            (GEMV_MAX_M + 1, 40, 64),
            (20, 30, 2 * GEMM_KC + 76),
            (100, 10, 33),
            (50, 130, 301),
            (14, 65, 257),
            (45, 200, 2 * BF16_KC_PAIRS + 3),
        ];
        for isa in isas() {
            for dtype in ["f32", "bf16", "f16"] {
                for (si, &(m, n, k)) in shapes.iter().enumerate() {
                    let w = matrix(dtype, n, k, si as u64 + 1);
                    let x = fill(m * k, si as u64 + 100);
                    let bias = fill(n, si as u64 + 200);
                    for b in [None, Some(bias.as_slice())] {
                        let mut out = vec![f32::NAN; m * n];
                        matmul_with(isa, &x, m, &w, b, &mut out);
                        let (want, mag) = reference(isa, &x, m, &w, b);
                        for j in 0..m * n {
                            let err = (f64::from(out[j]) - want[j]).abs();
                            assert!(
                                err <= 1e-5 * mag[j] + 1e-6,
                                "{isa:?} {dtype} m={m} n={n} k={k} bias={} [{j}]: {} vs {}",
                                b.is_some(),
                                out[j],
                                want[j]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn fast_path_agrees_with_scalar_path() {
        for isa in fast_isas() {
            for dtype in ["f32", "bf16", "f16"] {
                for &(m, n, k) in &[(1, 77, 512), (3, 40, 96), (8, 100, 256), (40, 97, 520)] {
                    let w = matrix(dtype, n, k, 7);
                    let mut x = fill(m * k, 8);
                    let bias = fill(n, 9);
                    let mut fast = vec![0.0; m * n];
                    let mut slow = vec![0.0; m * n];
                    matmul_with(isa, &x, m, &w, Some(&bias), &mut fast);
                    if rounds_x(isa, &w) {
                        x.iter_mut()
                            .for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
                    }
                    matmul_with(Isa::Scalar, &x, m, &w, Some(&bias), &mut slow);
                    let (_, mag) = reference(Isa::Scalar, &x, m, &w, Some(&bias));
                    for j in 0..m * n {
                        let err = f64::from((fast[j] - slow[j]).abs());
                        assert!(err <= 1e-5 * mag[j], "{isa:?} {dtype} {m}x{n}x{k} [{j}]");
                    }
                }
            }
        }
    }

    #[test]
    fn thread_count_does_not_change_results() {
        // Every output is summed in the same order however the work is split, so results
        // are bit-identical across thread counts (not across m: GEMV and GEMM differ).
        for isa in fast_isas() {
            for &(m, n, k) in &[(1, 300, 200), (9, 64, 300), (64, 20, 100), (40, 200, 600)] {
                let w = matrix("bf16", n, k, 3);
                let x = fill(m * k, 4);
                let mut want = vec![0.0; m * n];
                matmul_with(isa, &x, m, &w, None, &mut want);
                for threads in [1, 3, 0] {
                    // Other tests may run meanwhile; the thread count only changes their
                    // split.
                    super::super::pool::set_num_threads(threads);
                    let mut got = vec![0.0; m * n];
                    matmul_with(isa, &x, m, &w, None, &mut got);
                    assert_eq!(got, want, "{isa:?} {m}x{n}x{k} on {threads} threads");
                }
            }
        }
    }

    #[test]
    fn gemm_rows_do_not_depend_on_the_other_rows() {
        // Past GEMV_MAX_M a row's outputs are the same bits whatever rows come with it,
        // and wherever the row blocks (GEMM_MC) and register tiles fall.
        for isa in fast_isas() {
            for dtype in ["bf16", "f32"] {
                let (n, k) = (70, 2 * GEMM_KC + 41);
                let w = matrix(dtype, n, k, 11);
                let m = 3 * GEMM_MC + 7;
                let x = fill(m * k, 12);
                let mut all = vec![0.0; m * n];
                matmul_with(isa, &x, m, &w, None, &mut all);
                for (r0, r1) in [(0, GEMV_MAX_M + 1), (5, 40), (GEMM_MC - 3, 2 * GEMM_MC + 1)] {
                    let mut part = vec![0.0; (r1 - r0) * n];
                    matmul_with(isa, &x[r0 * k..r1 * k], r1 - r0, &w, None, &mut part);
                    assert_eq!(part, all[r0 * n..r1 * n], "{isa:?} {dtype} rows {r0}..{r1}");
                }
            }
        }
    }

    #[test]
    fn packed_only_weights_give_the_same_results_and_rows() {
        // Odd k and a partial last panel; m = 1 and a GEMM-sized batch.
        for &(n, k) in &[(130, 301), (64, 512), (7, 5)] {
            let w = matrix("bf16", n, k, 21);
            let mut packed = w.clone();
            let did = packed.keep_packed_only();
            assert_eq!(did, crate::backend::cpu::kernels::has_avx512_bf16());
            if !did {
                // Elsewhere the weights stay as they were.
                assert_eq!(packed, w);
                continue;
            }
            assert!(matches!(&packed.data, WeightData::Bf16(d) if d.is_empty()));
            assert_eq!(packed.bytes(), w.bytes());
            for m in [1, 40] {
                let x = fill(m * k, 22);
                let (mut want, mut got) = (vec![0.0; m * n], vec![0.0; m * n]);
                matmul(&x, m, &w, None, &mut want);
                matmul(&x, m, &packed, None, &mut got);
                assert_eq!(got, want, "{n}x{k}, m={m}");
            }
            let (mut want, mut got) = (vec![0.0; k], vec![0.0; k]);
            for r in [0, n / 2, n - 1] {
                w.row_f32(r, &mut want);
                packed.row_f32(r, &mut got);
                assert_eq!(got, want, "{n}x{k} row {r}");
            }
            assert!(!packed.keep_packed_only(), "packing twice");
        }
    }

    #[test]
    fn packed_only_weights_refuse_other_kernels() {
        let mut w = matrix("bf16", 8, 8, 1);
        if !w.keep_packed_only() {
            return; // nothing is dropped on CPUs without AVX-512 BF16
        }
        let err = std::panic::catch_unwind(|| {
            matmul_with(Isa::Scalar, &[0.0; 8], 1, &w, None, &mut [0.0; 8]);
        })
        .expect_err("the scalar path has no weights to read");
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            msg.contains("packed for the avx512bf16 kernels only"),
            "{msg}"
        );
    }

    #[test]
    fn degenerate_shapes() {
        let w = Matrix::from_f32(3, 0, vec![]);
        let mut out = vec![9.0; 6];
        matmul(&[], 2, &w, Some(&[1.0, 2.0, 3.0]), &mut out);
        assert_eq!(out, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
        matmul(&[], 2, &w, None, &mut out);
        assert_eq!(out, [0.0; 6]);
        let w = Matrix::from_f32(3, 4, vec![1.0; 12]);
        matmul(&[], 0, &w, None, &mut []);
    }

    #[test]
    #[should_panic(expected = "x is not")]
    fn wrong_input_length_panics() {
        let w = Matrix::from_f32(2, 2, vec![0.0; 4]);
        matmul(&[0.0; 3], 2, &w, None, &mut [0.0; 4]);
    }
}
