//! Helpers shared by the GPU check examples.

/// ‖a − r‖ / ‖r‖, infinite when the lengths differ or `a` has a non-finite value.
pub fn rel_err(a: &[f32], r: &[f32]) -> f64 {
    if a.len() != r.len() || a.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(r).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = r.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}
