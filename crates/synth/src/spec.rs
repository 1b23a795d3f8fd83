//! The shape of a synthetic model: dimensions per (arch, size), the Hugging Face
//! `config.json` and `generation_config.json` they imply, and the list of tensors with the
//! initialisation each one gets. Everything else in the crate is driven by this table.

use serde_json::{json, Value};

use crate::{Arch, DType, Size};

/// Llama-3 style RoPE scaling (`rope_type: "llama3"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: u64,
}

impl Llama3RopeScaling {
    /// The Llama 3.x scaling from an 8k original context, stretched by `factor`.
    pub fn llama3(factor: f64) -> Self {
        Llama3RopeScaling {
            factor,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }
    }
}

/// Dimensions and architectural switches of one synthetic model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub rms_norm_eps: f64,
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Zero-mean noise with this standard deviation.
    Normal { std: f32 },
    /// `1 + 0.1 * noise`: norm weights near one so activations keep their scale.
    NearOne,
}

/// One tensor of the checkpoint, in file order.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl ModelSpec {
    pub fn new(arch: Arch, size: Size) -> Self {
        let base = match size {
            Size::Tiny => ModelSpec {
                arch,
                hidden_size: 64,
                intermediate_size: 128,
                num_layers: 2,
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 16,
                vocab_size: 512,
                max_position_embeddings: 2048,
                tie_word_embeddings: false,
                rope_theta: 10_000.0,
                rope_scaling: None,
                rms_norm_eps: 1e-5,
            },
            Size::Small => ModelSpec {
                arch,
                hidden_size: 512,
                intermediate_size: 1536,
                num_layers: 8,
                num_heads: 8,
                num_kv_heads: 4,
                head_dim: 64,
                vocab_size: 8192,
                max_position_embeddings: 8192,
                tie_word_embeddings: false,
                rope_theta: 500_000.0,
                rope_scaling: None,
                rms_norm_eps: 1e-5,
            },
            Size::OneB => ModelSpec {
                arch,
                hidden_size: 2048,
                intermediate_size: 8192,
                num_layers: 16,
                num_heads: 32,
                num_kv_heads: 8,
                head_dim: 64,
                vocab_size: 128_256,
                max_position_embeddings: 131_072,
                tie_word_embeddings: true,
                rope_theta: 500_000.0,
                rope_scaling: Some(Llama3RopeScaling::llama3(32.0)),
                rms_norm_eps: 1e-5,
            },
            Size::EightB => ModelSpec {
                arch,
                hidden_size: 4096,
                intermediate_size: 14_336,
                num_layers: 32,
                num_heads: 32,
                num_kv_heads: 8,
                head_dim: 128,
                vocab_size: 128_256,
                max_position_embeddings: 131_072,
                tie_word_embeddings: false,
                rope_theta: 500_000.0,
                rope_scaling: Some(Llama3RopeScaling::llama3(8.0)),
                rms_norm_eps: 1e-5,
            },
            Size::SeventyB => ModelSpec {
                arch,
                hidden_size: 8192,
                intermediate_size: 28_672,
                num_layers: 80,
                num_heads: 64,
                num_kv_heads: 8,
                head_dim: 128,
                vocab_size: 128_256,
                max_position_embeddings: 131_072,
                tie_word_embeddings: false,
                rope_theta: 500_000.0,
                rope_scaling: Some(Llama3RopeScaling::llama3(8.0)),
                rms_norm_eps: 1e-5,
            },
        };
        base.with_arch_features(size)
    }

    /// Per-arch switches. Tiny models vary the most so that small tests cover every
    /// feature an engine must get right (tying, biases, q/k norms, explicit head_dim,
    /// RoPE scaling).
    fn with_arch_features(mut self, size: Size) -> Self {
        let tiny = size == Size::Tiny;
        match self.arch {
            Arch::Llama => {
                if tiny {
                    self.tie_word_embeddings = true;
                    self.rope_theta = 500_000.0;
                    self.rope_scaling = Some(Llama3RopeScaling {
                        factor: 8.0,
                        low_freq_factor: 1.0,
                        high_freq_factor: 4.0,
                        original_max_position_embeddings: 256,
                    });
                }
            }
            Arch::Mistral => {
                self.rope_theta = 1_000_000.0;
                self.rope_scaling = None;
                if tiny {
                    self.tie_word_embeddings = false;
                }
            }
            Arch::Qwen2 => {
                self.rope_theta = 1_000_000.0;
                self.rope_scaling = None;
                self.rms_norm_eps = 1e-6;
                if tiny {
                    self.tie_word_embeddings = true;
                }
            }
            Arch::Qwen3 => {
                self.rope_theta = 1_000_000.0;
                self.rope_scaling = None;
                self.rms_norm_eps = 1e-6;
                if tiny {
                    // Deliberately != hidden / heads, as in real Qwen3 checkpoints.
                    self.head_dim = 32;
                    self.tie_word_embeddings = false;
                }
            }
        }
        self
    }

    pub fn has_qkv_bias(&self) -> bool {
        self.arch == Arch::Qwen2
    }

    pub fn has_qk_norm(&self) -> bool {
        self.arch == Arch::Qwen3
    }

    /// Every tensor of the checkpoint in the order it is written.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let h = self.hidden_size;
        let q_out = self.num_heads * self.head_dim;
        let kv_out = self.num_kv_heads * self.head_dim;
        let inter = self.intermediate_size;
        let linear = |name: String, out: usize, inp: usize| TensorSpec {
            name,
            shape: vec![out, inp],
            init: Init::Normal {
                std: 1.0 / (inp as f32).sqrt(),
            },
        };
        let near_one = |name: String, n: usize| TensorSpec {
            name,
            shape: vec![n],
            init: Init::NearOne,
        };
        let bias = |name: String, n: usize| TensorSpec {
            name,
            shape: vec![n],
            init: Init::Normal { std: 0.1 },
        };

        // Untied embeddings get unit scale. A tied matrix is also the LM head, so it gets the
        // head's 1/sqrt(hidden): at unit scale a token's own embedding would dominate the
        // residual stream and every logit row, and greedy decoding would just repeat the last
        // token, which tests nothing.
        let embed_std = if self.tie_word_embeddings {
            1.0 / (h as f32).sqrt()
        } else {
            1.0
        };
        let mut out = vec![TensorSpec {
            name: "model.embed_tokens.weight".into(),
            shape: vec![self.vocab_size, h],
            init: Init::Normal { std: embed_std },
        }];
        for i in 0..self.num_layers {
            let p = format!("model.layers.{i}");
            out.push(near_one(format!("{p}.input_layernorm.weight"), h));
            out.push(linear(format!("{p}.self_attn.q_proj.weight"), q_out, h));
            out.push(linear(format!("{p}.self_attn.k_proj.weight"), kv_out, h));
            out.push(linear(format!("{p}.self_attn.v_proj.weight"), kv_out, h));
            if self.has_qkv_bias() {
                out.push(bias(format!("{p}.self_attn.q_proj.bias"), q_out));
                out.push(bias(format!("{p}.self_attn.k_proj.bias"), kv_out));
                out.push(bias(format!("{p}.self_attn.v_proj.bias"), kv_out));
            }
            if self.has_qk_norm() {
                out.push(near_one(
                    format!("{p}.self_attn.q_norm.weight"),
                    self.head_dim,
                ));
                out.push(near_one(
                    format!("{p}.self_attn.k_norm.weight"),
                    self.head_dim,
                ));
            }
            out.push(linear(format!("{p}.self_attn.o_proj.weight"), h, q_out));
            out.push(near_one(format!("{p}.post_attention_layernorm.weight"), h));
            out.push(linear(format!("{p}.mlp.gate_proj.weight"), inter, h));
            out.push(linear(format!("{p}.mlp.up_proj.weight"), inter, h));
            out.push(linear(format!("{p}.mlp.down_proj.weight"), h, inter));
        }
        out.push(near_one("model.norm.weight".into(), h));
        if !self.tie_word_embeddings {
            out.push(linear("lm_head.weight".into(), self.vocab_size, h));
        }
        out
    }

    pub fn num_params(&self) -> usize {
        self.tensors().iter().map(TensorSpec::numel).sum()
    }

    /// The Hugging Face `config.json`.
    pub fn config_json(&self, dtype: DType, ids: &SpecialIds) -> Value {
        let (model_type, architecture) = match self.arch {
            Arch::Llama => ("llama", "LlamaForCausalLM"),
            Arch::Mistral => ("mistral", "MistralForCausalLM"),
            Arch::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
            Arch::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
        };
        let mut c = json!({
            "architectures": [architecture],
            "model_type": model_type,
            "attention_dropout": 0.0,
            "bos_token_id": ids.config_bos,
            "eos_token_id": ids.config_eos,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": self.rope_scaling.map(|s| json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            })),
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            // Older transformers read `torch_dtype`, newer ones `dtype`.
            "torch_dtype": dtype.torch_name(),
            "dtype": dtype.torch_name(),
            "use_cache": true,
            "vocab_size": self.vocab_size,
        });
        let extra = match self.arch {
            Arch::Llama => json!({
                "attention_bias": false,
                "mlp_bias": false,
                "pretraining_tp": 1,
            }),
            Arch::Mistral => json!({ "sliding_window": null }),
            Arch::Qwen2 | Arch::Qwen3 => {
                let mut e = json!({
                    "use_sliding_window": false,
                    "sliding_window": null,
                    "max_window_layers": self.num_layers,
                });
                if self.arch == Arch::Qwen3 {
                    e["attention_bias"] = json!(false);
                }
                e
            }
        };
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(extra.clone());
        }
        c
    }
}

/// Special token ids as the model configs refer to them.
#[derive(Clone, Debug, PartialEq)]
pub struct SpecialIds {
    /// `bos_token_id` of config.json and generation_config.json (Qwen names `<|endoftext|>`
    /// here even though its tokenizer never adds it).
    pub config_bos: u32,
    /// `eos_token_id` of config.json: the end-of-turn token.
    pub config_eos: u32,
    /// `eos_token_id` of generation_config.json: every token that ends generation.
    pub generation_eos: Vec<u32>,
    pub pad: Option<u32>,
}

/// The Hugging Face `generation_config.json`.
pub fn generation_config_json(ids: &SpecialIds) -> Value {
    let eos = match ids.generation_eos.as_slice() {
        [one] => json!(one),
        many => json!(many),
    };
    let mut g = json!({
        "bos_token_id": ids.config_bos,
        "eos_token_id": eos,
    });
    if let Some(pad) = ids.pad {
        g["pad_token_id"] = json!(pad);
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_has_the_advertised_parameter_count() {
        for arch in [Arch::Llama, Arch::Mistral, Arch::Qwen3] {
            let spec = ModelSpec::new(arch, Size::Small);
            let n = spec.num_params();
            assert!((33_500_000..33_700_000).contains(&n), "{arch:?}: {n}");
        }
    }

    #[test]
    fn eight_b_matches_llama3_8b() {
        let spec = ModelSpec::new(Arch::Llama, Size::EightB);
        assert_eq!(spec.num_params(), 8_030_261_248);
    }

    #[test]
    fn seventy_b_matches_llama3_70b() {
        let spec = ModelSpec::new(Arch::Llama, Size::SeventyB);
        assert_eq!(spec.num_params(), 70_553_706_496);
    }

    #[test]
    fn one_b_matches_llama32_1b() {
        let spec = ModelSpec::new(Arch::Llama, Size::OneB);
        assert_eq!(spec.num_params(), 1_235_814_400);
        assert!(!spec.tensors().iter().any(|t| t.name == "lm_head.weight"));
    }

    #[test]
    fn arch_features_show_up_in_tensors() {
        let names = |arch| -> Vec<String> {
            ModelSpec::new(arch, Size::Tiny)
                .tensors()
                .into_iter()
                .map(|t| t.name)
                .collect()
        };
        assert!(names(Arch::Qwen2).contains(&"model.layers.1.self_attn.k_proj.bias".into()));
        assert!(names(Arch::Qwen3).contains(&"model.layers.0.self_attn.q_norm.weight".into()));
        assert!(names(Arch::Mistral).contains(&"lm_head.weight".into()));
        assert!(!names(Arch::Llama).contains(&"lm_head.weight".into()));
        let q3 = ModelSpec::new(Arch::Qwen3, Size::Tiny);
        let q = q3
            .tensors()
            .into_iter()
            .find(|t| t.name == "model.layers.0.self_attn.q_proj.weight")
            .map(|t| t.shape);
        assert_eq!(q, Some(vec![4 * 32, 64]));
    }
}
