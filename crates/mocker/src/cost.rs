//! How long a forward step takes, without running it: an analytic [`CostModel`] with
//! defaults for an 8B Llama-shaped model in bf16 on one H100 SXM, or a measured
//! [`Profile`] table. [`StepCost`] picks one of the two.
//!
//! Both look at a step the way the hardware sees it: a sequence with one new token is a
//! decode (memory-bound: the weights once per step, then its KV context), a sequence with
//! more is a prefill chunk (compute-bound: GEMMs linear in its new tokens, attention
//! quadratic in them).

use engine::backend::ForwardBatch;
use engine::model::ModelConfig;
use serde::{Deserialize, Serialize};

use crate::profile::Profile;
use crate::MockError;

/// Analytic step time. A step costs `step_base_s`, plus for each decoding sequence
/// `decode_per_seq_s + decode_per_kv_token_s × ctx_len`, plus for each prefill chunk of
/// `q` new tokens after `p` tokens of context `q / prefill_tokens_per_s +
/// prefill_attn_pair_s × (q·p + q(q+1)/2)` (the causal query-key pairs, so splitting a
/// prompt into chunks changes only how often the base is paid).
///
/// The defaults model Llama-3.1-8B (32 layers, 4096 hidden, 8 KV heads of 128, vocab
/// 128256) in bf16 on one H100 SXM (3.35 TB/s HBM3, 989 dense bf16 TFLOP/s). They are
/// derived from those figures with assumed efficiencies, not measured; load a [`Profile`]
/// for measured numbers.
/// - `step_base_s` 7 ms: one step reads ~15 GB of weights, 4.5 ms at peak bandwidth; the
///   rest stands for bandwidth below peak, kernel launches, sampling and scheduling.
/// - `decode_per_seq_s` 25 µs: 256 decodes then cost 6.4 ms more than one, about what
///   256 × 16 GFLOP of GEMMs take at ~650 TFLOP/s once they leave the bandwidth floor.
/// - `decode_per_kv_token_s` 50 ns: one token's K and V over all layers is 128 KiB
///   (2 × 32 × 8 × 128 × 2 bytes), read at ~2.6 TB/s.
/// - `prefill_tokens_per_s` 20 000: 16 GFLOP per token at ~320 TFLOP/s, a third of peak
///   for the whole layer (GEMMs, norms, activations); a 2k-token prompt then prefills at
///   ~18k tok/s with the base and attention added.
/// - `prefill_attn_pair_s` 1.5 ns: 4 × 4096 × 32 ≈ 0.52 MFLOP per query-key pair at
///   ~350 TFLOP/s of flash attention.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CostModel {
    /// Paid once by every step that runs: one pass over the weights plus overheads.
    pub step_base_s: f64,
    /// Paid by each sequence with one new token.
    pub decode_per_seq_s: f64,
    /// Paid per token of KV context of each sequence with one new token.
    pub decode_per_kv_token_s: f64,
    /// GEMM throughput for the new tokens of prefill chunks.
    pub prefill_tokens_per_s: f64,
    /// Paid per causal query-key pair of each prefill chunk.
    pub prefill_attn_pair_s: f64,
}

/// Share of the default base that does not scale with the weights (launches, sampling).
const FIXED_OVERHEAD_S: f64 = 1.5e-3;

impl Default for CostModel {
    fn default() -> Self {
        CostModel {
            step_base_s: 7.0e-3,
            decode_per_seq_s: 25.0e-6,
            decode_per_kv_token_s: 50.0e-9,
            prefill_tokens_per_s: 20_000.0,
            prefill_attn_pair_s: 1.5e-9,
        }
    }
}

/// Shape numbers of the reference model the defaults describe (Llama-3.1-8B).
struct Shape {
    hidden: f64,
    intermediate: f64,
    layers: f64,
    q_size: f64,
    kv_size: f64,
    vocab: f64,
}

impl Shape {
    const REFERENCE: Shape = Shape {
        hidden: 4096.0,
        intermediate: 14336.0,
        layers: 32.0,
        q_size: 4096.0,
        kv_size: 1024.0,
        vocab: 128_256.0,
    };

    fn of(cfg: &ModelConfig) -> Shape {
        Shape {
            hidden: cfg.hidden_size as f64,
            intermediate: cfg.intermediate_size as f64,
            layers: cfg.num_layers as f64,
            q_size: cfg.q_size() as f64,
            kv_size: cfg.kv_size() as f64,
            vocab: cfg.vocab_size as f64,
        }
    }

    /// Weights read by one forward step: the decoder layers and the LM head.
    fn step_params(&self) -> f64 {
        let attn = self.hidden * (self.q_size + 2.0 * self.kv_size) + self.q_size * self.hidden;
        let mlp = 3.0 * self.hidden * self.intermediate;
        self.layers * (attn + mlp) + self.vocab * self.hidden
    }

    fn kv_elems_per_token(&self) -> f64 {
        2.0 * self.layers * self.kv_size
    }

    fn attn_flops_per_pair(&self) -> f64 {
        4.0 * self.q_size * self.layers
    }
}

impl CostModel {
    /// The defaults rescaled to another model's shape on the same GPU: weight-bound terms
    /// by its parameters per step, the KV term by its KV bytes per token, attention by its
    /// query width × layers. A fixed 1.5 ms of the base stays as it is.
    pub fn for_model(cfg: &ModelConfig) -> CostModel {
        let d = CostModel::default();
        let (r, m) = (Shape::REFERENCE, Shape::of(cfg));
        let weights = m.step_params() / r.step_params();
        let kv = m.kv_elems_per_token() / r.kv_elems_per_token();
        let attn = m.attn_flops_per_pair() / r.attn_flops_per_pair();
        CostModel {
            step_base_s: FIXED_OVERHEAD_S + (d.step_base_s - FIXED_OVERHEAD_S) * weights,
            decode_per_seq_s: d.decode_per_seq_s * weights,
            decode_per_kv_token_s: d.decode_per_kv_token_s * kv,
            prefill_tokens_per_s: d.prefill_tokens_per_s / weights.max(f64::MIN_POSITIVE),
            prefill_attn_pair_s: d.prefill_attn_pair_s * attn,
        }
    }

    /// Checks every field is finite and in range; the error names the field.
    pub fn validate(&self) -> Result<(), MockError> {
        let non_negative = [
            ("cost.step_base_s", self.step_base_s),
            ("cost.decode_per_seq_s", self.decode_per_seq_s),
            ("cost.decode_per_kv_token_s", self.decode_per_kv_token_s),
            ("cost.prefill_attn_pair_s", self.prefill_attn_pair_s),
        ];
        for (field, v) in non_negative {
            if !(v.is_finite() && v >= 0.0) {
                return Err(MockError::invalid(
                    field,
                    format!("must be a finite number ≥ 0, got {v}"),
                ));
            }
        }
        let rate = self.prefill_tokens_per_s;
        if !(rate.is_finite() && rate > 0.0) {
            return Err(MockError::invalid(
                "cost.prefill_tokens_per_s",
                format!("must be a finite number > 0, got {rate}"),
            ));
        }
        Ok(())
    }

    pub fn step_seconds(&self, batch: &ForwardBatch) -> f64 {
        self.step_seconds_of(shapes(batch))
    }

    /// Step time of sequences given as `(new_tokens, ctx_len)`, `ctx_len` counting the new
    /// tokens (as [`engine::backend::SeqSlice`] does). An empty step costs nothing.
    pub fn step_seconds_of(&self, seqs: impl IntoIterator<Item = (usize, usize)>) -> f64 {
        let mut t = 0.0;
        let mut any = false;
        for (q, ctx) in seqs {
            if q == 0 {
                continue;
            }
            any = true;
            if q == 1 {
                t += self.decode_per_seq_s + self.decode_per_kv_token_s * ctx as f64;
            } else {
                let q = q as f64;
                let prior = ctx as f64 - q;
                let pairs = q * prior + q * (q + 1.0) / 2.0;
                t += q / self.prefill_tokens_per_s + self.prefill_attn_pair_s * pairs;
            }
        }
        if any {
            t + self.step_base_s
        } else {
            0.0
        }
    }
}

/// Where step times come from.
#[derive(Clone, Debug, PartialEq)]
pub enum StepCost {
    Model(CostModel),
    Profile(Profile),
}

impl Default for StepCost {
    fn default() -> Self {
        StepCost::Model(CostModel::default())
    }
}

impl From<CostModel> for StepCost {
    fn from(m: CostModel) -> Self {
        StepCost::Model(m)
    }
}

impl From<Profile> for StepCost {
    fn from(p: Profile) -> Self {
        StepCost::Profile(p)
    }
}

impl StepCost {
    pub fn step_seconds(&self, batch: &ForwardBatch) -> f64 {
        self.step_seconds_of(shapes(batch))
    }

    /// See [`CostModel::step_seconds_of`].
    pub fn step_seconds_of(&self, seqs: impl IntoIterator<Item = (usize, usize)>) -> f64 {
        match self {
            StepCost::Model(m) => m.step_seconds_of(seqs),
            StepCost::Profile(p) => p.step_seconds_of(seqs),
        }
    }

    pub fn validate(&self) -> Result<(), MockError> {
        match self {
            StepCost::Model(m) => m.validate(),
            // A profile is checked when it is built.
            StepCost::Profile(_) => Ok(()),
        }
    }
}

fn shapes(batch: &ForwardBatch) -> impl Iterator<Item = (usize, usize)> + '_ {
    batch.seqs.iter().map(|s| (s.q_len, s.ctx_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_grows_with_batch_and_context() {
        let m = CostModel::default();
        let one = m.step_seconds_of([(1, 100)]);
        assert!((one - (7.0e-3 + 25e-6 + 100.0 * 50e-9)).abs() < 1e-12);
        let wide = m.step_seconds_of(vec![(1, 100); 64]);
        let long = m.step_seconds_of([(1, 100_000)]);
        assert!(wide > one && long > one);
        assert_eq!(m.step_seconds_of([]), 0.0);
    }

    #[test]
    fn prefill_is_quadratic_and_chunking_keeps_the_pairs() {
        let m = CostModel {
            step_base_s: 0.0,
            ..CostModel::default()
        };
        let whole = m.step_seconds_of([(4096, 4096)]);
        let chunks: f64 = (0..4)
            .map(|i| m.step_seconds_of([(1024, (i + 1) * 1024)]))
            .sum();
        assert!((whole - chunks).abs() < 1e-9, "{whole} vs {chunks}");
        let half = m.step_seconds_of([(2048, 2048)]);
        // More than twice as long for twice the tokens: the attention term.
        assert!(whole > 2.0 * half);
        // With a 2k prompt the default lands in the 10–20k tok/s range.
        let full = CostModel::default().step_seconds_of([(2048, 2048)]);
        let rate = 2048.0 / full;
        assert!((10_000.0..20_000.0).contains(&rate), "{rate}");
    }

    #[test]
    fn for_model_reproduces_the_defaults_on_the_reference_shape() {
        let json = r#"{"model_type":"llama","hidden_size":4096,"intermediate_size":14336,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,
            "vocab_size":128256,"max_position_embeddings":131072,"eos_token_id":128001}"#;
        let cfg = ModelConfig::from_json_str(json, std::path::Path::new("config.json")).unwrap();
        let scaled = CostModel::for_model(&cfg);
        let d = CostModel::default();
        for (a, b) in [
            (scaled.step_base_s, d.step_base_s),
            (scaled.decode_per_seq_s, d.decode_per_seq_s),
            (scaled.decode_per_kv_token_s, d.decode_per_kv_token_s),
            (scaled.prefill_tokens_per_s, d.prefill_tokens_per_s),
            (scaled.prefill_attn_pair_s, d.prefill_attn_pair_s),
        ] {
            assert!((a - b).abs() <= 1e-9 * b.abs(), "{a} vs {b}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let bad = CostModel {
            prefill_tokens_per_s: 0.0,
            ..CostModel::default()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("cost.prefill_tokens_per_s"), "{err}");
    }
}
