//! [`MockOptions`]: what a simulated instance looks like, and [`build_mock_engine`], which
//! puts the real scheduler and block pool over a [`MockExecutor`].

use engine::core::{EngineConfig, LlmEngine, SchedulerConfig};
use engine::model::ModelConfig;

use crate::cost::{CostModel, StepCost};
use crate::executor::{MockExecutor, Timing};
use crate::MockError;

#[derive(Clone, Debug)]
pub struct MockOptions {
    pub vocab_size: usize,
    /// Generated tokens are drawn from `0..output_vocab` (default: the whole vocabulary),
    /// so a real tokenizer's special tokens above it never show up in the text.
    pub output_vocab: Option<usize>,
    /// Ids the engine stops on. The mock generates them only as `eos_probability` asks,
    /// so by default every request runs to its `max_tokens`.
    pub eos_token_ids: Vec<u32>,
    /// Chance that a generated token is the first EOS id (deterministic per position), so
    /// outputs end early; 0 makes every request run to `max_tokens`.
    pub eos_probability: f64,
    pub max_model_len: usize,
    /// Block count and size, token budget and sequence cap: KV capacity is
    /// `num_blocks × block_size` tokens, with no memory behind it.
    pub scheduler: SchedulerConfig,
    pub cost: StepCost,
    pub timing: Timing,
}

/// KV blocks of 16 tokens an 8B bf16 model leaves on one 80 GB H100 at 90% memory use:
/// (72 GB − 15 GB of weights − ~5 GB of activations and graphs) / 128 KiB per token / 16.
const H100_8B_NUM_BLOCKS: usize = 24_576;

impl Default for MockOptions {
    /// Llama-3.1-8B on one H100: its vocabulary and EOS ids, a 32k context, the KV cache
    /// the GPU would leave, and [`CostModel::default`] on the wall clock.
    fn default() -> Self {
        MockOptions {
            vocab_size: 128_256,
            output_vocab: Some(128_000),
            eos_token_ids: vec![128_001, 128_008, 128_009],
            eos_probability: 0.0,
            max_model_len: 32_768,
            scheduler: SchedulerConfig {
                num_blocks: H100_8B_NUM_BLOCKS,
                ..SchedulerConfig::default()
            },
            cost: StepCost::Model(CostModel::default()),
            timing: Timing::WallClock { speedup: 1.0 },
        }
    }
}

impl MockOptions {
    /// An instance shaped like the model in `cfg` (vocabulary, EOS ids, context window;
    /// step costs scaled to its size by [`CostModel::for_model`]), so a real tokenizer and
    /// chat template can front the mock. Special tokens are kept out of the output when
    /// they sit at the top of the vocabulary, as in the Llama and Qwen families.
    pub fn from_model_config(cfg: &ModelConfig) -> MockOptions {
        let first_special = cfg
            .eos_token_ids
            .iter()
            .chain(cfg.bos_token_id.iter())
            .copied()
            .min()
            .map(|t| t as usize);
        let output_vocab = first_special.filter(|&s| s >= cfg.vocab_size / 2 && s < cfg.vocab_size);
        MockOptions {
            vocab_size: cfg.vocab_size,
            output_vocab,
            eos_token_ids: cfg.eos_token_ids.clone(),
            max_model_len: cfg.max_position_embeddings,
            cost: StepCost::Model(CostModel::for_model(cfg)),
            ..MockOptions::default()
        }
    }

    /// The same instance on virtual time (simulation).
    pub fn virtual_time(mut self) -> Self {
        self.timing = Timing::Virtual;
        self
    }

    fn output_vocab(&self) -> usize {
        self.output_vocab.unwrap_or(self.vocab_size)
    }

    /// Checks every field once; the error names the bad one.
    pub fn validate(&self) -> Result<(), MockError> {
        if self.vocab_size == 0 || self.vocab_size > u32::MAX as usize {
            return Err(MockError::invalid(
                "vocab_size",
                format!("must be between 1 and {}", u32::MAX),
            ));
        }
        let out = self.output_vocab();
        if out == 0 || out > self.vocab_size {
            return Err(MockError::invalid(
                "output_vocab",
                format!("must be between 1 and vocab_size ({})", self.vocab_size),
            ));
        }
        if (0..out as u32).all(|t| self.eos_token_ids.contains(&t)) {
            return Err(MockError::invalid(
                "output_vocab",
                "every token it allows is an EOS id",
            ));
        }
        if !(0.0..=1.0).contains(&self.eos_probability) {
            return Err(MockError::invalid(
                "eos_probability",
                format!("must be within [0, 1], got {}", self.eos_probability),
            ));
        }
        if self.max_model_len < 2 {
            return Err(MockError::invalid("max_model_len", "must be at least 2"));
        }
        let s = &self.scheduler;
        for (field, v) in [
            ("scheduler.block_size", s.block_size),
            ("scheduler.num_blocks", s.num_blocks),
            ("scheduler.max_batched_tokens", s.max_batched_tokens),
            ("scheduler.max_num_seqs", s.max_num_seqs),
        ] {
            if v == 0 {
                return Err(MockError::invalid(field, "must be at least 1"));
            }
        }
        if s.num_blocks >= u32::MAX as usize {
            return Err(MockError::invalid(
                "scheduler.num_blocks",
                format!("must be below {}", u32::MAX),
            ));
        }
        self.cost.validate()?;
        if let Timing::WallClock { speedup } = self.timing {
            if !(speedup.is_finite() && speedup > 0.0) {
                return Err(MockError::invalid(
                    "timing.speedup",
                    format!("must be a finite number > 0, got {speedup}"),
                ));
            }
        }
        Ok(())
    }

    /// The executor alone, for callers that assemble their own engine.
    pub fn executor(&self) -> Result<MockExecutor, MockError> {
        self.validate()?;
        Ok(MockExecutor::new(
            self.vocab_size,
            self.output_vocab(),
            self.eos_token_ids.clone(),
            self.eos_probability,
            self.cost.clone(),
            self.timing,
        ))
    }

    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            scheduler: self.scheduler.clone(),
            max_model_len: self.max_model_len,
            eos_token_ids: self.eos_token_ids.clone(),
        }
    }
}

/// The real engine (scheduler, block pool, KV events) over a [`MockExecutor`].
pub fn build_mock_engine(opts: &MockOptions) -> Result<LlmEngine<MockExecutor>, MockError> {
    let exec = opts.executor()?;
    Ok(LlmEngine::new(opts.engine_config(), exec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_fields_are_named() {
        MockOptions::default().validate().unwrap();
        let mut o = MockOptions::default();
        o.scheduler.block_size = 0;
        let err = o.validate().unwrap_err().to_string();
        assert!(err.contains("scheduler.block_size"), "{err}");
        let o = MockOptions {
            timing: Timing::WallClock { speedup: 0.0 },
            ..MockOptions::default()
        };
        assert!(o
            .validate()
            .unwrap_err()
            .to_string()
            .contains("timing.speedup"));
        let o = MockOptions {
            vocab_size: 2,
            output_vocab: None,
            eos_token_ids: vec![0, 1],
            ..MockOptions::default()
        };
        assert!(o
            .validate()
            .unwrap_err()
            .to_string()
            .contains("output_vocab"));
    }

    #[test]
    fn from_model_config_keeps_specials_out_of_the_output() {
        let json = r#"{"model_type":"qwen2","hidden_size":896,"intermediate_size":4864,
            "num_hidden_layers":24,"num_attention_heads":14,"num_key_value_heads":2,
            "vocab_size":151936,"max_position_embeddings":32768,
            "bos_token_id":151643,"eos_token_id":151645}"#;
        let cfg = ModelConfig::from_json_str(json, std::path::Path::new("config.json")).unwrap();
        let o = MockOptions::from_model_config(&cfg);
        o.validate().unwrap();
        assert_eq!(o.vocab_size, 151_936);
        assert_eq!(o.output_vocab, Some(151_643));
        assert_eq!(o.eos_token_ids, vec![151_645]);
        assert_eq!(o.max_model_len, 32_768);
        // A 0.5B model steps faster than the 8B default.
        let StepCost::Model(m) = o.cost else {
            panic!("a cost model")
        };
        assert!(m.step_base_s < CostModel::default().step_base_s);
    }
}
