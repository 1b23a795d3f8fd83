//! Hugging Face `config.json` → [`ModelConfig`]: the one place that knows how each
//! architecture family spells its hyper-parameters.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::ModelError;

/// Decoder families that share the Llama block structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }
}

/// Rotary embedding frequency scaling.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f32 },
    /// Llama 3's wavelength-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: f32,
    },
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Per-head RMSNorm of q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        let mut cfg = Self::from_json_str(&text, &path)?;
        // generation_config.json may widen the EOS set (Llama 3 lists eot_id there).
        let gen_path = dir.join("generation_config.json");
        if let Ok(text) = std::fs::read_to_string(&gen_path) {
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                for id in token_ids(v.get("eos_token_id")) {
                    if !cfg.eos_token_ids.contains(&id) {
                        cfg.eos_token_ids.push(id);
                    }
                }
            }
        }
        Ok(cfg)
    }

    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, ModelError> {
        let v: Value = serde_json::from_str(text).map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            msg: format!("invalid JSON: {e}"),
        })?;
        let p = Parser { v: &v, path };
        let model_type = p.str("model_type")?;
        let arch = match model_type.as_str() {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            other => {
                return Err(ModelError::UnsupportedArch {
                    path: path.to_path_buf(),
                    arch: other.to_string(),
                })
            }
        };
        let hidden_size = p.usize("hidden_size")?;
        let num_heads = p.usize("num_attention_heads")?;
        let num_kv_heads = p.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match p.opt_usize("head_dim")? {
            Some(d) => d,
            None => {
                if num_heads == 0 || hidden_size % num_heads != 0 {
                    return Err(p.err("hidden_size must be divisible by num_attention_heads"));
                }
                hidden_size / num_heads
            }
        };
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(p.err("num_attention_heads must be a multiple of num_key_value_heads"));
        }
        if head_dim % 2 != 0 {
            return Err(p.err("head_dim must be even for rotary embeddings"));
        }
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(p.err(&format!("hidden_act {act:?} is not supported (only silu)")));
            }
        }
        let attention_bias = v
            .get("attention_bias")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let (qkv_bias, o_bias, qk_norm) = match arch {
            Arch::Llama => (attention_bias, attention_bias, false),
            Arch::Mistral => (false, false, false),
            Arch::Qwen2 => (true, false, false),
            Arch::Qwen3 => (attention_bias, false, true),
        };
        let rope_theta = v
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| {
                v.get("rope_parameters")
                    .and_then(|r| r.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10_000.0) as f32;
        let scaling = v
            .get("rope_scaling")
            .filter(|s| !s.is_null())
            .or_else(|| v.get("rope_parameters").filter(|s| !s.is_null()));
        let rope_scaling = match scaling {
            None => None,
            Some(s) => parse_rope_scaling(s, &p)?,
        };
        let tie_default = false;
        Ok(ModelConfig {
            arch,
            hidden_size,
            intermediate_size: p.usize("intermediate_size")?,
            num_layers: p.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: p.usize("vocab_size")?,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings: p.opt_usize("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(tie_default),
            qkv_bias,
            o_bias,
            qk_norm,
            bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(v.get("eos_token_id")),
        })
    }

    pub fn q_size(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_size(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Inverse rotary frequencies, one per pair of head dimensions, with scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        let base: Vec<f32> = (0..dim / 2)
            .map(|i| (1.0 / (self.rope_theta as f64).powf((2 * i) as f64 / dim as f64)) as f32)
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let low_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_wavelen = original_max_position_embeddings / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original_max_position_embeddings / wavelen
                                - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

fn parse_rope_scaling(s: &Value, p: &Parser) -> Result<Option<RopeScaling>, ModelError> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f32, ModelError> {
        s.get(key)
            .and_then(Value::as_f64)
            .map(|x| x as f32)
            .ok_or_else(|| p.err(&format!("rope_scaling.{key} is missing or not a number")))
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor")?,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        })),
        other => Err(p.err(&format!(
            "rope_scaling type {other:?} is not supported (default, linear, llama3)"
        ))),
    }
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => Vec::new(),
    }
}

struct Parser<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Parser<'_> {
    fn err(&self, msg: &str) -> ModelError {
        ModelError::Config {
            path: PathBuf::from(self.path),
            msg: msg.to_string(),
        }
    }

    fn str(&self, key: &str) -> Result<String, ModelError> {
        self.v
            .get(key)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| self.err(&format!("field {key:?} is missing or not a string")))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(&format!("field {key:?} must be a non-negative integer"))),
        }
    }

    fn usize(&self, key: &str) -> Result<usize, ModelError> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(&format!("field {key:?} is missing")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig, ModelError> {
        ModelConfig::from_json_str(text, Path::new("config.json"))
    }

    #[test]
    fn unsupported_arch_is_named() {
        let err = parse(r#"{"model_type": "gpt2"}"#).unwrap_err().to_string();
        assert!(err.contains("gpt2") && err.contains("config.json"), "{err}");
    }

    #[test]
    fn missing_field_is_named() {
        let err = parse(r#"{"model_type": "llama", "hidden_size": 64}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_attention_heads"), "{err}");
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let cfg = parse(
            r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":2,
            "vocab_size":32,"rope_theta":500000.0,
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":256}}"#,
        )
        .unwrap();
        let scaled = cfg.rope_inv_freq();
        let mut plain = cfg.clone();
        plain.rope_scaling = None;
        let base = plain.rope_inv_freq();
        assert_eq!(scaled[0], base[0]);
        let last = base.len() - 1;
        assert!((scaled[last] - base[last] / 8.0).abs() < 1e-12);
    }
}
