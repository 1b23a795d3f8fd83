//! A measured step-time table, for when the analytic [`crate::CostModel`] is not close
//! enough: prefill points (new tokens → seconds) and decode points (batch size, total KV
//! tokens → seconds), as JSON:
//!
//! ```json
//! { "prefill": [ {"new_tokens": 512, "seconds": 0.034}, {"new_tokens": 2048, "seconds": 0.11} ],
//!   "decode":  [ {"batch_size": 1, "kv_tokens": 1024, "seconds": 0.0071},
//!                {"batch_size": 64, "kv_tokens": 65536, "seconds": 0.0125} ] }
//! ```
//!
//! Prefill interpolates linearly in the step's new prefill tokens. Decode interpolates
//! linearly in KV tokens within each measured batch size, then linearly between the two
//! batch sizes around the query (bilinear on a grid, and still defined when each batch
//! size was measured at its own KV points). Queries outside the table take the nearest
//! edge, except prefill past the largest measured prompt, which continues the last
//! segment's slope (prefill time does not stop growing with tokens). A step that mixes both pays the decode time plus what the prefill adds above the
//! cheapest decode point (the fixed cost both measurements already include).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefillPoint {
    pub new_tokens: u64,
    pub seconds: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodePoint {
    pub batch_size: u64,
    /// Sum of the context lengths of the decoding sequences.
    pub kv_tokens: u64,
    pub seconds: f64,
}

/// The file format of a profile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfilePoints {
    pub prefill: Vec<PrefillPoint>,
    pub decode: Vec<DecodePoint>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("reading the profile {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `field` is a path into the file such as `decode[3].seconds`.
    #[error("{origin}: field `{field}`: {message}")]
    Invalid {
        origin: String,
        field: String,
        message: String,
    },
}

/// A validated profile, cheap to clone (instances share the tables).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ProfilePoints", into = "ProfilePoints")]
pub struct Profile {
    tables: Arc<Tables>,
}

#[derive(Debug, PartialEq)]
struct Tables {
    points: ProfilePoints,
    /// `(new_tokens, seconds)` by new tokens.
    prefill: Curve,
    /// One curve over KV tokens per batch size, by batch size.
    decode: Vec<(f64, Curve)>,
    /// The cheapest decode point's time: the fixed cost of any step.
    floor: f64,
}

/// Points sorted by x with distinct x; linear between them, flat beyond the ends.
#[derive(Debug, PartialEq)]
struct Curve(Vec<(f64, f64)>);

impl Curve {
    fn at(&self, x: f64) -> f64 {
        let pts = &self.0;
        let i = pts.partition_point(|&(px, _)| px < x);
        if i == 0 {
            return pts[0].1;
        }
        if i == pts.len() {
            return pts[i - 1].1;
        }
        let (x0, y0) = pts[i - 1];
        let (x1, y1) = pts[i];
        y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    }

    /// As [`Curve::at`], but past the last point the line through the last two points
    /// continues (never decreasing): prefill time keeps growing with tokens beyond the
    /// largest measured prompt instead of staying flat.
    fn at_or_extend(&self, x: f64) -> f64 {
        let pts = &self.0;
        let n = pts.len();
        match pts.last() {
            Some(&(xl, yl)) if x > xl => {
                let slope = if n >= 2 {
                    let (xp, yp) = pts[n - 2];
                    ((yl - yp) / (xl - xp)).max(0.0)
                } else if xl > 0.0 {
                    yl / xl
                } else {
                    0.0
                };
                yl + slope * (x - xl)
            }
            _ => self.at(x),
        }
    }
}

impl Profile {
    /// Reads and validates a JSON profile; errors name the file and the bad field.
    pub fn load(path: &Path) -> Result<Profile, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses a JSON profile; `origin` names it in errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Profile, ProfileError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let points: ProfilePoints =
            serde_path_to_error::deserialize(de).map_err(|e| ProfileError::Invalid {
                origin: origin.to_string(),
                field: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        Self::new(points).map_err(|e| match e {
            ProfileError::Invalid { field, message, .. } => ProfileError::Invalid {
                origin: origin.to_string(),
                field,
                message,
            },
            other => other,
        })
    }

    /// Validates points: at least one of each kind, finite non-negative seconds, no two
    /// points at the same coordinates.
    pub fn new(points: ProfilePoints) -> Result<Profile, ProfileError> {
        let invalid = |field: String, message: &str| ProfileError::Invalid {
            origin: "profile".into(),
            field,
            message: message.to_string(),
        };
        if points.prefill.is_empty() {
            return Err(invalid("prefill".into(), "needs at least one point"));
        }
        if points.decode.is_empty() {
            return Err(invalid("decode".into(), "needs at least one point"));
        }
        let bad_seconds = |s: f64| !(s.is_finite() && s >= 0.0);
        for (i, p) in points.prefill.iter().enumerate() {
            if bad_seconds(p.seconds) {
                return Err(invalid(
                    format!("prefill[{i}].seconds"),
                    "must be a finite number ≥ 0",
                ));
            }
        }
        for (i, p) in points.decode.iter().enumerate() {
            if bad_seconds(p.seconds) {
                return Err(invalid(
                    format!("decode[{i}].seconds"),
                    "must be a finite number ≥ 0",
                ));
            }
            if p.batch_size == 0 {
                return Err(invalid(
                    format!("decode[{i}].batch_size"),
                    "must be at least 1",
                ));
            }
        }

        let mut prefill: Vec<(usize, &PrefillPoint)> = points.prefill.iter().enumerate().collect();
        prefill.sort_by_key(|(_, p)| p.new_tokens);
        for w in prefill.windows(2) {
            if w[0].1.new_tokens == w[1].1.new_tokens {
                return Err(invalid(
                    format!("prefill[{}].new_tokens", w[1].0.max(w[0].0)),
                    "repeats another point's new_tokens",
                ));
            }
        }
        let prefill = Curve(
            prefill
                .iter()
                .map(|(_, p)| (p.new_tokens as f64, p.seconds))
                .collect(),
        );

        let mut decode_pts: Vec<(usize, &DecodePoint)> = points.decode.iter().enumerate().collect();
        decode_pts.sort_by_key(|(_, p)| (p.batch_size, p.kv_tokens));
        for w in decode_pts.windows(2) {
            let (a, b) = (w[0].1, w[1].1);
            if (a.batch_size, a.kv_tokens) == (b.batch_size, b.kv_tokens) {
                return Err(invalid(
                    format!("decode[{}]", w[1].0.max(w[0].0)),
                    "repeats another point's batch_size and kv_tokens",
                ));
            }
        }
        let mut decode: Vec<(f64, Curve)> = Vec::new();
        for (_, p) in decode_pts {
            let b = p.batch_size as f64;
            match decode.last_mut() {
                Some((lb, curve)) if *lb == b => curve.0.push((p.kv_tokens as f64, p.seconds)),
                _ => decode.push((b, Curve(vec![(p.kv_tokens as f64, p.seconds)]))),
            }
        }
        let floor = points
            .decode
            .iter()
            .map(|p| p.seconds)
            .fold(f64::INFINITY, f64::min);
        Ok(Profile {
            tables: Arc::new(Tables {
                points,
                prefill,
                decode,
                floor,
            }),
        })
    }

    pub fn points(&self) -> &ProfilePoints {
        &self.tables.points
    }

    /// Prefill time of a step with `new_tokens` prompt tokens and no decodes.
    pub fn prefill_seconds(&self, new_tokens: usize) -> f64 {
        self.tables.prefill.at_or_extend(new_tokens as f64)
    }

    /// Decode time of `batch_size` sequences holding `kv_tokens` of context in all.
    pub fn decode_seconds(&self, batch_size: usize, kv_tokens: usize) -> f64 {
        let rows = &self.tables.decode;
        let (b, kv) = (batch_size as f64, kv_tokens as f64);
        let i = rows.partition_point(|(rb, _)| *rb < b);
        if i == 0 {
            return rows[0].1.at(kv);
        }
        if i == rows.len() {
            return rows[i - 1].1.at(kv);
        }
        let (b0, c0) = &rows[i - 1];
        let (b1, c1) = &rows[i];
        let (y0, y1) = (c0.at(kv), c1.at(kv));
        y0 + (y1 - y0) * (b - b0) / (b1 - b0)
    }

    /// Step time of sequences given as `(new_tokens, ctx_len)`; see the module docs.
    pub fn step_seconds_of(&self, seqs: impl IntoIterator<Item = (usize, usize)>) -> f64 {
        let (mut batch, mut kv, mut prefill) = (0, 0, 0);
        for (q, ctx) in seqs {
            match q {
                0 => {}
                1 => {
                    batch += 1;
                    kv += ctx;
                }
                _ => prefill += q,
            }
        }
        match (batch, prefill) {
            (0, 0) => 0.0,
            (0, n) => self.prefill_seconds(n),
            (b, 0) => self.decode_seconds(b, kv),
            (b, n) => {
                self.decode_seconds(b, kv) + (self.prefill_seconds(n) - self.tables.floor).max(0.0)
            }
        }
    }
}

impl TryFrom<ProfilePoints> for Profile {
    type Error = ProfileError;

    fn try_from(points: ProfilePoints) -> Result<Self, Self::Error> {
        Profile::new(points)
    }
}

impl From<Profile> for ProfilePoints {
    fn from(p: Profile) -> Self {
        p.tables.points.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{
        "prefill": [{"new_tokens": 2048, "seconds": 0.2}, {"new_tokens": 1024, "seconds": 0.1}],
        "decode": [
            {"batch_size": 1, "kv_tokens": 0, "seconds": 0.01},
            {"batch_size": 1, "kv_tokens": 1000, "seconds": 0.02},
            {"batch_size": 9, "kv_tokens": 0, "seconds": 0.03},
            {"batch_size": 9, "kv_tokens": 1000, "seconds": 0.05}
        ]
    }"#;

    #[test]
    fn interpolates_and_clamps() {
        let p = Profile::from_json_str(SAMPLE, "sample").unwrap();
        assert!((p.prefill_seconds(1536) - 0.15).abs() < 1e-12);
        assert_eq!(p.prefill_seconds(10), 0.1);
        // Past the largest prompt, the last segment's slope continues (0.1 s per 1024).
        assert!((p.prefill_seconds(4096) - 0.4).abs() < 1e-12);
        assert!((p.decode_seconds(1, 500) - 0.015).abs() < 1e-12);
        // Halfway in batch and in KV: the mean of the four corners.
        assert!((p.decode_seconds(5, 500) - 0.0275).abs() < 1e-12);
        assert_eq!(p.decode_seconds(100, 5000), 0.05);
        // A mixed step: decode plus the prefill above the 10 ms floor.
        let mixed = p.step_seconds_of([(1, 500), (1024, 1024)]);
        assert!((mixed - (0.015 + 0.09)).abs() < 1e-12);
    }

    #[test]
    fn round_trips_through_json() {
        let p = Profile::from_json_str(SAMPLE, "sample").unwrap();
        let text = serde_json::to_string(&p).unwrap();
        let back: Profile = serde_json::from_str(&text).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                r#"{"prefill": [{"new_tokens": 1, "seconds": "x"}], "decode": []}"#,
                "prefill[0].seconds",
            ),
            (
                r#"{"prefill": [{"new_tokens": 1, "seconds": 1}]}"#,
                "decode",
            ),
            (
                r#"{"prefill": [{"new_tokens": 1, "seconds": 1}], "decode": []}"#,
                "decode",
            ),
            (
                r#"{"prefill": [{"new_tokens": 1, "seconds": 1}],
                    "decode": [{"batch_size": 1, "kv_tokens": 0, "seconds": -1}]}"#,
                "decode[0].seconds",
            ),
            (
                r#"{"prefill": [{"new_tokens": 1, "seconds": 1}, {"new_tokens": 1, "seconds": 2}],
                    "decode": [{"batch_size": 1, "kv_tokens": 0, "seconds": 1}]}"#,
                "prefill[1].new_tokens",
            ),
            (
                r#"{"prefill": [{"new_tokens": 1, "seconds": 1, "extra": 0}], "decode": []}"#,
                "prefill[0]",
            ),
        ];
        for (text, field) in cases {
            let err = Profile::from_json_str(text, "p.json")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("`{field}`")) || err.contains(field),
                "{err} should name {field}"
            );
            assert!(err.starts_with("p.json"), "{err}");
        }
        let missing = Profile::load(Path::new("/nonexistent/profile.json")).unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/profile.json"));
    }
}
