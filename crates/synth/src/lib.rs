//! `switchyard model synth`: random-weight models in real Hugging Face format.
//!
//! A synthesized directory looks like a checkpoint from the Hub (config.json, safetensors
//! weights, sharded above 4 GiB, tokenizer.json and tokenizer_config.json with a chat
//! template, generation_config.json) and loads in Hugging Face transformers, so tests, demos
//! and benchmarks need no model download and the engine's loading path is the real one.
//! Output is a pure function of [`SynthOptions`] (minus `out` and `progress`): equal options
//! give byte-identical files whatever the thread count.

mod chat_templates;
mod corpus;
mod pipeline;
mod rng;
mod spec;
mod tokenizer;
mod weights;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use spec::{Init, Llama3RopeScaling, ModelSpec, SpecialIds, TensorSpec};
pub use weights::{CHUNK_ELEMS, SHARD_LIMIT_BYTES};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    Tiny,
    Small,
    OneB,
    EightB,
    SeventyB,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    Bf16,
    F16,
    F32,
}

#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub out: PathBuf,
    pub arch: Arch,
    pub size: Size,
    pub dtype: DType,
    pub seed: u64,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// What can go wrong while synthesizing.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serialize JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot build the tokenizer: {0}")]
    Tokenizer(String),
}

impl SynthError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        SynthError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A name that is not one of an enum's spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {given:?}; expected one of: {expected}")]
pub struct ParseNameError {
    kind: &'static str,
    given: String,
    expected: &'static str,
}

macro_rules! named_enum {
    ($ty:ident, $kind:literal, $($variant:ident => $name:literal),+ $(,)?) => {
        impl $ty {
            /// The spelling used on the command line.
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $name),+ }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $ty {
            type Err = ParseNameError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    _ => Err(ParseNameError {
                        kind: $kind,
                        given: s.to_string(),
                        expected: concat!($($name, " "),+),
                    }),
                }
            }
        }
    };
}

named_enum!(Arch, "arch", Llama => "llama", Mistral => "mistral", Qwen2 => "qwen2", Qwen3 => "qwen3");
named_enum!(Size, "size", Tiny => "tiny", Small => "small", OneB => "1b", EightB => "8b", SeventyB => "70b");
named_enum!(DType, "dtype", Bf16 => "bf16", F16 => "f16", F32 => "f32");

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::Bf16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }

    /// The `torch_dtype` / `dtype` spelling of config.json.
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::Bf16 => "bfloat16",
            DType::F16 => "float16",
            DType::F32 => "float32",
        }
    }

    /// The dtype spelling of a safetensors header.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::Bf16 => "BF16",
            DType::F16 => "F16",
            DType::F32 => "F32",
        }
    }
}

/// Files a previous run may have left that would contradict this one (a single file next to
/// shards, or the reverse); only these names are ever removed.
fn is_stale_weight_file(name: &str) -> bool {
    name == "model.safetensors"
        || name == "model.safetensors.index.json"
        || (name.starts_with("model-") && name.ends_with(".safetensors") && name.contains("-of-"))
}

/// Writes the model directory. Deterministic for equal options.
pub fn synthesize(opts: &SynthOptions) -> anyhow::Result<()> {
    synthesize_dir(opts)?;
    Ok(())
}

/// [`synthesize`] with a typed error.
pub fn synthesize_dir(opts: &SynthOptions) -> Result<(), SynthError> {
    let dir = &opts.out;
    std::fs::create_dir_all(dir).map_err(|e| SynthError::io(dir, e))?;
    let entries = std::fs::read_dir(dir).map_err(|e| SynthError::io(dir, e))?;
    for entry in entries.flatten() {
        if entry.file_name().to_str().is_some_and(is_stale_weight_file) {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|e| SynthError::io(&path, e))?;
        }
    }

    let spec = ModelSpec::new(opts.arch, opts.size);
    let tok = tokenizer::build(
        opts.arch,
        spec.vocab_size.min(tokenizer::MAX_TRAINED_VOCAB),
        spec.max_position_embeddings,
    )?;
    if tok.vocab_size > spec.vocab_size {
        // Token ids past the embedding table would crash every loader.
        return Err(SynthError::Tokenizer(format!(
            "trained {} tokens for a model vocabulary of {}",
            tok.vocab_size, spec.vocab_size
        )));
    }
    write_json(
        &dir.join("config.json"),
        &spec.config_json(opts.dtype, &tok.ids),
    )?;
    write_json(
        &dir.join("generation_config.json"),
        &spec::generation_config_json(&tok.ids),
    )?;
    let tokenizer_path = dir.join("tokenizer.json");
    std::fs::write(&tokenizer_path, &tok.tokenizer_json)
        .map_err(|e| SynthError::io(&tokenizer_path, e))?;
    write_json(&dir.join("tokenizer_config.json"), &tok.tokenizer_config)?;
    weights::write_weights(dir, &spec.tensors(), opts.dtype, opts.seed, opts.progress)?;
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), SynthError> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| SynthError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for a in [Arch::Llama, Arch::Mistral, Arch::Qwen2, Arch::Qwen3] {
            assert_eq!(a.as_str().parse::<Arch>(), Ok(a));
        }
        assert_eq!("8b".parse::<Size>(), Ok(Size::EightB));
        let err = "fp8".parse::<DType>().unwrap_err().to_string();
        assert!(err.contains("fp8") && err.contains("bf16"), "{err}");
    }

    #[test]
    fn stale_files_are_recognised_narrowly() {
        assert!(is_stale_weight_file("model-00001-of-00004.safetensors"));
        assert!(is_stale_weight_file("model.safetensors"));
        assert!(!is_stale_weight_file("adapter.safetensors"));
        assert!(!is_stale_weight_file("config.json"));
    }
}
