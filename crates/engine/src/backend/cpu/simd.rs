//! Plain-Rust inner loops compiled twice: once inside `#[target_feature(enable =
//! "avx2,fma")]` functions, where LLVM vectorises them to 256-bit code, and once portable.
//! The loops keep eight independent lanes so reductions vectorise without reassociating
//! floating-point sums (which LLVM will not do on its own).

/// Lane count of the explicit reductions: one AVX2 register of f32.
pub const LANES: usize = 8;

/// `a * b + c`, fused where the caller was compiled with FMA.
#[inline(always)]
pub fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `Σ a[i]·b[i]` (lengths must be equal). `FMA = true` may only be instantiated inside
/// code that has verified AVX2 + FMA support: it uses those instructions directly.
#[inline(always)]
pub fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: FMA = true is only used on CPUs with AVX2 and FMA (see above).
        return unsafe { dot_avx2(a, b) };
    }
    dot_portable::<FMA>(a, b)
}

/// The same reduction order as [`dot_portable`]: eight lanes, then pairwise.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len()) / LANES * LANES;
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i < n {
        // SAFETY: i + 8 <= n <= both lengths.
        let x = _mm256_loadu_ps(a.as_ptr().add(i));
        let y = _mm256_loadu_ps(b.as_ptr().add(i));
        acc = _mm256_fmadd_ps(x, y, acc);
        i += LANES;
    }
    let mut tail = 0f32;
    for (x, y) in a[n..].iter().zip(&b[n..]) {
        tail = x.mul_add(*y, tail);
    }
    let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    // [s0+s2, s1+s3, ..] then the two halves: (s0+s2)+(s1+s3).
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    _mm_cvtss_f32(s1) + tail
}

/// Portable eight-lane dot product.
#[inline(always)]
pub fn dot_portable<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ac, ar) = a.split_at(a.len() / LANES * LANES);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(LANES).zip(bc.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] = madd::<FMA>(x[l], y[l], acc[l]);
        }
    }
    let mut tail = 0f32;
    for (x, y) in ar.iter().zip(br) {
        tail = madd::<FMA>(*x, *y, tail);
    }
    // Pairwise, so the order is fixed whatever the caller.
    let s4 = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (s4[0] + s4[2]) + (s4[1] + s4[3]) + tail
}

/// `y += alpha · x`.
#[inline(always)]
pub fn axpy<const FMA: bool>(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = madd::<FMA>(alpha, *x, *y);
    }
}

/// The range reduction and polynomial of [`exp`], shared with the vector kernels' copies
/// (`attention.rs`, `attention_avx512.rs`) so that all of them compute the same values.
pub(super) mod exp_consts {
    /// Below this, `e^x` is under f32's smallest normal and taken as 0.
    pub const MIN: f32 = -87.336_55;
    /// Above this, `e^x` overflows f32.
    pub const MAX: f32 = 88.722_83;
    /// ln 2 split in two so `n·LN2_HI` is exact.
    pub const LN2_HI: f32 = 0.693_359_4;
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    /// Coefficients of `p(r)`, highest first; `e^r ≈ 1 + r + r²·p(r)`.
    pub const POLY: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ];
}

/// `e^x` for f32, within a few ulp over the whole range (Cephes-style range reduction and a
/// degree-6 polynomial); branch-free so loops over it vectorise. Large negative inputs give
/// 0, large positive +inf, NaN stays NaN.
#[inline(always)]
pub fn exp<const FMA: bool>(x: f32) -> f32 {
    use exp_consts::{LN2_HI, LN2_LO, MAX, MIN, POLY};
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // max/min drop NaN (clamp would keep it), so xc is always finite and the int
    // conversion below is exact.
    #[allow(clippy::manual_clamp)]
    let xc = x.max(MIN).min(MAX);
    let n = madd::<FMA>(xc, LOG2E, 0.5).floor();
    let r = madd::<FMA>(n, -LN2_HI, xc);
    let r = madd::<FMA>(n, -LN2_LO, r);
    let mut p = POLY[0];
    for c in &POLY[1..] {
        p = madd::<FMA>(p, r, *c);
    }
    let p = madd::<FMA>(p, r * r, r) + 1.0;
    // 2^n through the exponent bits; n is in [-126, 128] after the clamp.
    // SAFETY: n is finite and within [-127, 129].
    let n: i32 = unsafe { n.to_int_unchecked() };
    let scaled = p * f32::from_bits(((n.clamp(-126, 127) + 127) as u32) << 23);
    let out = if n > 127 { scaled * 2.0 } else { scaled };
    // Preserve the limits the clamp hid.
    if x < MIN {
        0.0
    } else if x > MAX {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_to_a_few_ulp() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = x.exp();
            let got = exp::<false>(x);
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(exp::<false>(-1000.0), 0.0);
        assert_eq!(exp::<false>(1000.0), f32::INFINITY);
        assert!(exp::<false>(f32::NAN).is_nan());
        assert_eq!(exp::<true>(0.0), 1.0);
    }

    #[test]
    fn dot_and_axpy_match_naive() {
        for n in [0usize, 1, 7, 8, 9, 64, 67] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(x * y)).sum();
            assert!((f64::from(dot::<true>(&a, &b)) - want).abs() < 1e-4);
            let mut y = b.clone();
            axpy::<false>(2.0, &a, &mut y);
            assert!(y
                .iter()
                .zip(&a)
                .zip(&b)
                .all(|((y, a), b)| (y - (b + 2.0 * a)).abs() < 1e-6));
        }
    }
}
