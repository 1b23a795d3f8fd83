//! f32 vector helpers for the per-token ops around the matmuls (attention scores and
//! value accumulation, residual scaling). Single-threaded: they are called on short rows
//! from inside the model's own parallel loops.

use super::Isa;

/// `Σ a[i]·b[i]` over the common length.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len(), "dot of unequal lengths");
    match Isa::detect() {
        // SAFETY: both ISAs `detect` returned here include AVX2, FMA and F16C.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Bf16 => unsafe { super::avx2::dot(a, b) },
        Isa::Scalar => super::matmul::scalar_dot(a, b),
    }
}

/// `y += alpha · x` over the common length.
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len(), "axpy of unequal lengths");
    match Isa::detect() {
        // SAFETY: as in `dot`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Bf16 => unsafe { super::avx2::axpy(alpha, x, y) },
        Isa::Scalar => {
            for (y, x) in y.iter_mut().zip(x) {
                *y = alpha.mul_add(*x, *y);
            }
        }
    }
}

/// `x *= alpha`.
pub fn scale(alpha: f32, x: &mut [f32]) {
    match Isa::detect() {
        // SAFETY: as in `dot`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Bf16 => unsafe { super::avx2::scale(alpha, x) },
        Isa::Scalar => x.iter_mut().for_each(|v| *v *= alpha),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers_match_naive_loops_on_every_length() {
        for n in [0, 1, 7, 8, 9, 31, 32, 33, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(x * y)).sum();
            assert!((f64::from(dot(&a, &b)) - want).abs() < 1e-4, "dot n={n}");

            let mut y = b.clone();
            axpy(0.5, &a, &mut y);
            for i in 0..n {
                assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6, "axpy n={n}");
            }
            scale(-2.0, &mut y);
            for i in 0..n {
                assert!(
                    (y[i] + 2.0 * (b[i] + 0.5 * a[i])).abs() < 1e-5,
                    "scale n={n}"
                );
            }
        }
    }
}
