//! A model directory's tokenizer as the serving path needs it: the `tokenizers` model from
//! `tokenizer.json`, plus what Hugging Face keeps beside it: special tokens and the chat
//! template from `tokenizer_config.json` (or `chat_template.jinja`), end-of-sequence ids from
//! `generation_config.json`. Mirrors what `AutoTokenizer` reads, so ids match transformers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use crate::token_bytes::TokenBytes;

/// What can go wrong loading or running a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot load {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("cannot encode text: {0}")]
    Encode(String),
    #[error("cannot decode token ids: {0}")]
    Decode(String),
}

/// A loaded tokenizer with its special-token metadata.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    chat_template: Option<String>,
    /// Per-token bytes, when decoding is a plain byte concatenation (byte-level BPE).
    token_bytes: Option<Arc<TokenBytes>>,
}

impl From<tokenizers::Tokenizer> for Tokenizer {
    /// A bare tokenizer with no special-token metadata and no chat template.
    fn from(inner: tokenizers::Tokenizer) -> Self {
        Tokenizer {
            token_bytes: TokenBytes::build(&inner).map(Arc::new),
            inner,
            bos_token: None,
            eos_token: None,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            chat_template: None,
        }
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` (required), `tokenizer_config.json`, `chat_template.jinja` and
    /// `generation_config.json` (each optional) from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let tokenizer_path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&tokenizer_path).map_err(|source| TokenizerError::Read {
            path: tokenizer_path.clone(),
            source,
        })?;
        let inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Load {
                path: tokenizer_path,
                message: e.to_string(),
            })?;
        let mut tok = Tokenizer::from(inner);

        let config_path = dir.join("tokenizer_config.json");
        let config = read_optional_json(&config_path)?.unwrap_or(Value::Null);
        tok.bos_token = token_content(&config["bos_token"]);
        tok.eos_token = token_content(&config["eos_token"]);
        tok.chat_template = chat_template_from_config(&config["chat_template"]);
        // Newer transformers save the template as its own file, which then wins.
        let jinja_path = dir.join("chat_template.jinja");
        match std::fs::read_to_string(&jinja_path) {
            Ok(t) => tok.chat_template = Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(TokenizerError::Read {
                    path: jinja_path,
                    source,
                })
            }
        }

        let named_id = |name: &Option<String>, field: &str| -> Result<_, TokenizerError> {
            match name {
                None => Ok(None),
                Some(t) => match tok.inner.token_to_id(t) {
                    Some(id) => Ok(Some(id)),
                    None => Err(TokenizerError::Invalid {
                        path: config_path.clone(),
                        message: format!("{field} {t:?} is not in the vocabulary"),
                    }),
                },
            }
        };
        tok.bos_token_id = named_id(&tok.bos_token, "bos_token")?;
        let config_eos = named_id(&tok.eos_token, "eos_token")?;

        let generation_path = dir.join("generation_config.json");
        let generation = read_optional_json(&generation_path)?.unwrap_or(Value::Null);
        let mut eos =
            ids_field(&generation["eos_token_id"]).map_err(|message| TokenizerError::Invalid {
                path: generation_path,
                message,
            })?;
        eos.extend(config_eos);
        let mut seen = std::collections::HashSet::new();
        eos.retain(|id| seen.insert(*id));
        tok.eos_token_ids = eos;
        Ok(tok)
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor
    /// (e.g. a leading BOS), as transformers does by default.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// Number of ids the tokenizer can produce, added tokens included. The model's
    /// embedding table may be larger.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The `bos_token` of tokenizer_config.json. `None` for families that never add one
    /// (Qwen), even when generation_config.json names a `bos_token_id`.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// The `eos_token` of tokenizer_config.json: what the chat template ends turns with.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Every id that ends generation: generation_config.json's `eos_token_id` (one or a
    /// list) then tokenizer_config.json's `eos_token`, without duplicates.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_ids.clone()
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Compiles the chat template with this tokenizer's BOS and EOS strings.
    pub fn chat_template_renderer(&self) -> Result<crate::ChatTemplate, crate::ChatTemplateError> {
        let source = self
            .chat_template
            .as_deref()
            .ok_or(crate::ChatTemplateError::Missing)?;
        crate::ChatTemplate::new(source, self.bos_token.clone(), self.eos_token.clone())
    }

    /// Each token's bytes, for tokenizers whose decoding is context-free (byte-level BPE);
    /// `None` for the others (SentencePiece-style decoders that strip or merge).
    pub fn token_bytes(&self) -> Option<&TokenBytes> {
        self.token_bytes.as_deref()
    }

    /// The underlying `tokenizers` tokenizer, for what this wrapper does not expose.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

fn read_optional_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TokenizerError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| TokenizerError::Json {
            path: path.to_path_buf(),
            source,
        })
}

/// A special token as tokenizer_config.json spells it: a string, or an `AddedToken` object
/// with `content`.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which "default" is used.
fn chat_template_from_config(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => {
            let named = |name: &str| {
                list.iter()
                    .find(|t| t["name"] == name)
                    .and_then(|t| t["template"].as_str())
            };
            named("default").map(str::to_string)
        }
        _ => None,
    }
}

/// An id field that may be absent, a number or a list of numbers.
fn ids_field(v: &Value) -> Result<Vec<u32>, String> {
    let one = |x: &Value| {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("eos_token_id {x} is not a token id"))
    };
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Array(list) => list.iter().map(one).collect(),
        x => one(x).map(|id| vec![id]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::AddedToken;

    /// A byte-level tokenizer with no merges plus three special tokens at 256..=258.
    fn write_model_dir(dir: &Path, config: Value, generation: Option<Value>) {
        let vocab: tokenizers::models::bpe::Vocab = ByteLevel::alphabet()
            .into_iter()
            .map(|c| c.to_string())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .enumerate()
            .map(|(i, c)| (c, i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, vec![])
            .build()
            .unwrap();
        let mut tok = tokenizers::Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tok.with_decoder(Some(ByteLevel::default()));
        tok.add_special_tokens(&[
            AddedToken::from("<s>", true),
            AddedToken::from("</s>", true),
            AddedToken::from("<eot>", true),
        ]);
        tok.save(dir.join("tokenizer.json"), false).unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        if let Some(g) = generation {
            std::fs::write(dir.join("generation_config.json"), g.to_string()).unwrap();
        }
    }

    #[test]
    fn reads_special_tokens_and_unions_eos() {
        let dir = tempfile::tempdir().unwrap();
        write_model_dir(
            dir.path(),
            json!({
                "bos_token": {"content": "<s>", "__type": "AddedToken"},
                "eos_token": "<eot>",
                "chat_template": [{"name": "tool_use", "template": "x"},
                                  {"name": "default", "template": "{{ bos_token }}"}],
            }),
            Some(json!({"eos_token_id": [257, 258]})),
        );
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.bos_token_id(), Some(256));
        assert_eq!(tok.eos_token_ids(), vec![257, 258]);
        assert_eq!(tok.chat_template(), Some("{{ bos_token }}"));
        assert_eq!(tok.vocab_size(), 259);
        let ids = tok.encode("héllo<eot>", false).unwrap();
        assert_eq!(ids.last(), Some(&258));
        assert_eq!(tok.decode(&ids, true).unwrap(), "héllo");
        assert_eq!(tok.decode(&ids, false).unwrap(), "héllo<eot>");
    }

    #[test]
    fn jinja_file_wins_and_configs_are_optional() {
        let dir = tempfile::tempdir().unwrap();
        write_model_dir(dir.path(), json!({"chat_template": "old"}), None);
        std::fs::write(dir.path().join("chat_template.jinja"), "new").unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.chat_template(), Some("new"));
        assert_eq!(tok.bos_token_id(), None);
        assert!(tok.eos_token_ids().is_empty());
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");

        write_model_dir(dir.path(), json!({"eos_token": "<nope>"}), None);
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("<nope>"),
            "{err}"
        );

        write_model_dir(dir.path(), json!({}), Some(json!({"eos_token_id": "x"})));
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("generation_config.json"), "{err}");

        std::fs::write(dir.path().join("tokenizer_config.json"), "{not json").unwrap();
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer_config.json"), "{err}");
    }
}
