//! The synthetic tokenizer: a byte-level BPE trained with the `tokenizers` crate on
//! [`crate::corpus`], dressed up like each family's real tokenizer (pre-tokenizer regex,
//! special tokens, BOS post-processor, chat template), plus the `tokenizer_config.json`
//! that lets `AutoTokenizer` and our own loader pick it up. Special tokens sit at the end
//! of the vocabulary, where Llama 3 and Qwen keep them.

use std::collections::HashSet;

use serde_json::{json, Map, Value};
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::spec::SpecialIds;
use crate::{chat_templates, Arch, SynthError};

/// The largest vocabulary we train; bigger models keep unused embedding rows beyond it, as
/// many real checkpoints do.
pub const MAX_TRAINED_VOCAB: usize = 8192;

/// Corpus seed: the tokenizer depends only on (family, vocabulary size), not on the weight
/// seed, so every model of one family and size tokenizes identically.
const CORPUS_SEED: u64 = 0x746F_6B65_6E73; // "tokens"

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer side of one family.
struct Family {
    specials: &'static [&'static str],
    bos: Option<&'static str>,
    /// `eos_token` of tokenizer_config.json: what ends an assistant turn.
    eos: &'static str,
    /// Every token that ends generation (generation_config.json).
    generation_eos: &'static [&'static str],
    /// `bos_token_id` in the model configs.
    config_bos: &'static str,
    pad: Option<&'static str>,
    chat_template: &'static str,
}

fn family(arch: Arch) -> Family {
    match arch {
        Arch::Llama => Family {
            specials: &[
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ],
            bos: Some("<|begin_of_text|>"),
            eos: "<|eot_id|>",
            generation_eos: &["<|end_of_text|>", "<|eot_id|>"],
            config_bos: "<|begin_of_text|>",
            pad: None,
            chat_template: chat_templates::LLAMA3,
        },
        Arch::Mistral => Family {
            specials: &["<s>", "</s>", "[INST]", "[/INST]"],
            bos: Some("<s>"),
            eos: "</s>",
            generation_eos: &["</s>"],
            config_bos: "<s>",
            pad: None,
            chat_template: chat_templates::MISTRAL,
        },
        Arch::Qwen2 | Arch::Qwen3 => Family {
            specials: &["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            bos: None,
            eos: "<|im_end|>",
            generation_eos: &["<|im_end|>", "<|endoftext|>"],
            config_bos: "<|endoftext|>",
            pad: Some("<|endoftext|>"),
            chat_template: if arch == Arch::Qwen3 {
                chat_templates::CHATML_QWEN3
            } else {
                chat_templates::CHATML
            },
        },
    }
}

/// Everything the model directory needs from the tokenizer.
pub struct TokenizerFiles {
    /// `tokenizer.json`.
    pub tokenizer_json: String,
    /// `tokenizer_config.json`.
    pub tokenizer_config: Value,
    pub ids: SpecialIds,
    pub vocab_size: usize,
}

/// Trains the tokenizer for `arch` with `vocab_size` entries including special tokens.
pub fn build(
    arch: Arch,
    vocab_size: usize,
    model_max_length: usize,
) -> Result<TokenizerFiles, SynthError> {
    let fam = family(arch);
    let mut tok = Tokenizer::new(BPE::default());
    match arch {
        Arch::Llama => {
            tok.with_pre_tokenizer(Some(Sequence::new(vec![
                split(LLAMA3_SPLIT)?,
                ByteLevel::new(false, true, false).into(),
            ])));
        }
        Arch::Mistral => {
            tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        }
        Arch::Qwen2 | Arch::Qwen3 => {
            tok.with_normalizer(Some(NFC));
            tok.with_pre_tokenizer(Some(Sequence::new(vec![
                split(QWEN2_SPLIT)?,
                ByteLevel::new(false, false, false).into(),
            ])));
        }
    }
    tok.with_decoder(Some(ByteLevel::default()));

    let merges_target = vocab_size.saturating_sub(fam.specials.len());
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let mut trainer: TrainerWrapper = BpeTrainer::builder()
        .vocab_size(merges_target)
        .min_frequency(0)
        .show_progress(false)
        .initial_alphabet(alphabet)
        .build()
        .into();
    // Enough distinct words that even 8k merges find material; sized to train in well
    // under a second.
    let (corpus_bytes, made_up_words) = if vocab_size <= 1024 {
        (200_000, 400)
    } else {
        (1_500_000, 3000)
    };
    let corpus = crate::corpus::generate(CORPUS_SEED, corpus_bytes, made_up_words);
    tok.train(&mut trainer, corpus.iter())
        .map_err(|e| SynthError::Tokenizer(e.to_string()))?;
    let added: Vec<AddedToken> = fam
        .specials
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect();
    tok.add_special_tokens(&added);

    match arch {
        Arch::Llama | Arch::Mistral => {
            let bos = fam.bos.unwrap_or_default();
            let bos_id = special_id(&tok, bos)?;
            let post = TemplateProcessing::builder()
                .try_single(format!("{bos} $A"))
                .and_then(|b| b.try_pair(format!("{bos} $A {bos}:1 $B:1")))
                .map_err(|e| SynthError::Tokenizer(e.to_string()))?
                .special_tokens(vec![(bos.to_string(), bos_id)])
                .build()
                .map_err(|e| SynthError::Tokenizer(e.to_string()))?;
            tok.with_post_processor(Some(post));
        }
        Arch::Qwen2 | Arch::Qwen3 => {
            tok.with_post_processor(Some(ByteLevel::new(false, false, false)));
        }
    }

    let id = |content: &str| special_id(&tok, content);
    let ids = SpecialIds {
        config_bos: id(fam.config_bos)?,
        config_eos: id(fam.eos)?,
        generation_eos: fam
            .generation_eos
            .iter()
            .map(|t| id(t))
            .collect::<Result<_, _>>()?,
        pad: fam.pad.map(id).transpose()?,
    };
    let mut added_decoder = Map::new();
    for s in fam.specials {
        added_decoder.insert(
            id(s)?.to_string(),
            json!({
                "content": s,
                "lstrip": false,
                "normalized": false,
                "rstrip": false,
                "single_word": false,
                "special": true,
            }),
        );
    }
    let mut config = json!({
        "added_tokens_decoder": added_decoder,
        "bos_token": fam.bos,
        "chat_template": fam.chat_template,
        "clean_up_tokenization_spaces": false,
        "eos_token": fam.eos,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if let Some(pad) = fam.pad {
        config["pad_token"] = json!(pad);
    }

    let tokenizer_json = tok
        .to_string(true)
        .map_err(|e| SynthError::Tokenizer(e.to_string()))?;
    Ok(TokenizerFiles {
        tokenizer_json,
        tokenizer_config: config,
        ids,
        vocab_size: tok.get_vocab_size(true),
    })
}

fn special_id(tok: &Tokenizer, content: &str) -> Result<u32, SynthError> {
    tok.token_to_id(content)
        .ok_or_else(|| SynthError::Tokenizer(format!("special token {content} has no id")))
}

fn split(pattern: &str) -> Result<PreTokenizerWrapper, SynthError> {
    Split::new(
        SplitPattern::Regex(pattern.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map(Into::into)
    .map_err(|e| SynthError::Tokenizer(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_vocab_is_exact_and_training_is_deterministic() {
        for arch in [Arch::Llama, Arch::Mistral, Arch::Qwen2] {
            let a = build(arch, 512, 2048).unwrap();
            assert_eq!(a.vocab_size, 512, "{arch:?}");
            let b = build(arch, 512, 2048).unwrap();
            assert_eq!(a.tokenizer_json, b.tokenizer_json);
            // Special tokens are the last ids.
            assert!(a.ids.generation_eos.iter().all(|&id| id >= 505));
        }
    }

    #[test]
    fn full_size_vocab_is_exact_and_fast() {
        // The corpus must hold enough material for every merge of the largest vocabulary.
        let start = std::time::Instant::now();
        let a = build(Arch::Llama, MAX_TRAINED_VOCAB, 8192).unwrap();
        let elapsed = start.elapsed();
        assert_eq!(a.vocab_size, MAX_TRAINED_VOCAB);
        // Generous for debug builds on a busy machine; release trains in well under 1 s.
        assert!(elapsed.as_secs() < 10, "training took {elapsed:?}");
    }

    #[test]
    fn llama_adds_bos_and_qwen_does_not() {
        let llama = build(Arch::Llama, 512, 2048).unwrap();
        let tok = Tokenizer::from_bytes(llama.tokenizer_json.as_bytes()).unwrap();
        let enc = tok.encode("Hello world", true).unwrap();
        assert_eq!(enc.get_ids()[0], llama.ids.config_bos);
        assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "Hello world");

        let qwen = build(Arch::Qwen2, 512, 2048).unwrap();
        let tok = Tokenizer::from_bytes(qwen.tokenizer_json.as_bytes()).unwrap();
        let enc = tok.encode("Hello world", true).unwrap();
        assert_ne!(enc.get_ids()[0], qwen.ids.config_bos);
        let chat = tok.encode("<|im_start|>user\nhi<|im_end|>", true).unwrap();
        assert_eq!(chat.get_ids()[0], tok.token_to_id("<|im_start|>").unwrap());
    }
}
