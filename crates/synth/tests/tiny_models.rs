//! End-to-end checks of synthesized tiny models: the files load with our own tokenizer and
//! safetensors reader, agree with what Hugging Face transformers saw when the golden
//! fixtures were made (token ids, chat prompt), and are byte-for-byte reproducible.

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use synth::{Arch, DType, ModelSpec, Size, SynthOptions};
use tokens::{ChatMessage, ChatOptions, ChatTemplateError, Tokenizer};

const ARCHS: [Arch; 4] = [Arch::Llama, Arch::Mistral, Arch::Qwen2, Arch::Qwen3];

fn synth(dir: &Path, arch: Arch, dtype: DType, seed: u64) {
    synth::synthesize(&SynthOptions {
        out: dir.to_path_buf(),
        arch,
        size: Size::Tiny,
        dtype,
        seed,
        progress: false,
    })
    .unwrap_or_else(|e| panic!("synthesize {arch}: {e:#}"));
}

fn golden(arch: Arch) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../engine/tests/fixtures")
        .join(format!("golden_{arch}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (see scripts/golden/README.md)", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn tokenizer_and_chat_template_match_transformers() {
    for arch in ARCHS {
        let dir = tempfile::tempdir().unwrap();
        synth(dir.path(), arch, DType::F32, 7);
        let gold = golden(arch);
        let tok = Tokenizer::from_dir(dir.path()).unwrap();

        assert_eq!(tok.vocab_size(), 512, "{arch}");
        assert_eq!(
            tok.bos_token_id().map(u64::from),
            gold["bos_token_id"].as_u64(),
            "{arch}"
        );
        let gold_eos = match &gold["eos_token_id"] {
            Value::Array(_) => ids(&gold["eos_token_id"]),
            one => vec![one.as_u64().unwrap() as u32],
        };
        assert!(
            gold_eos.iter().all(|id| tok.eos_token_ids().contains(id)),
            "{arch}: {:?} vs {gold_eos:?}",
            tok.eos_token_ids()
        );

        for case in gold["cases"].as_array().unwrap() {
            let Some(prompt) = case["prompt"].as_str() else {
                continue;
            };
            let ours = tok.encode(prompt, true).unwrap();
            assert_eq!(ours, ids(&case["prompt_ids"]), "{arch}: {prompt:?}");
            let plain = tok.encode(prompt, false).unwrap();
            assert_eq!(tok.decode(&plain, false).unwrap(), prompt, "{arch}");
        }

        let chat = &gold["chat"];
        let messages: Vec<ChatMessage> = serde_json::from_value(chat["messages"].clone()).unwrap();
        let template = tok.chat_template_renderer().unwrap();
        let options = ChatOptions {
            add_generation_prompt: chat["add_generation_prompt"].as_bool().unwrap(),
            ..Default::default()
        };
        let text = template.render(&messages, &options).unwrap();
        assert_eq!(text, chat["text"].as_str().unwrap(), "{arch}");
        assert_eq!(
            tok.encode(&text, false).unwrap(),
            ids(&chat["ids"]),
            "{arch}"
        );

        let bad = [ChatMessage::new("robot", "beep")];
        assert!(
            matches!(
                template.render(&bad, &options),
                Err(ChatTemplateError::Rejected(_))
            ),
            "{arch}: unknown roles must be rejected"
        );
    }
}

#[test]
fn weights_round_trip_through_safetensors() {
    for arch in ARCHS {
        let dir = tempfile::tempdir().unwrap();
        synth(dir.path(), arch, DType::Bf16, 3);
        let spec = ModelSpec::new(arch, Size::Tiny);
        let config = read_json(&dir.path().join("config.json"));
        assert_eq!(config["vocab_size"], 512);
        assert_eq!(config["torch_dtype"], "bfloat16");
        assert_eq!(config["head_dim"], spec.head_dim);
        assert_eq!(config["tie_word_embeddings"], spec.tie_word_embeddings);

        let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let expected = spec.tensors();
        assert_eq!(st.len(), expected.len(), "{arch}");
        for t in &expected {
            let view = st.tensor(&t.name).unwrap();
            assert_eq!(view.shape(), t.shape.as_slice(), "{arch} {}", t.name);
            assert_eq!(view.dtype(), Dtype::BF16);
        }
        // Norm weights sit near one; projections are centred with std 1/sqrt(fan_in).
        let values = |name: &str| -> Vec<f32> {
            st.tensor(name)
                .unwrap()
                .data()
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect()
        };
        let norm = values("model.norm.weight");
        let mean = norm.iter().sum::<f32>() / norm.len() as f32;
        assert!((mean - 1.0).abs() < 0.05, "{arch}: {mean}");
        let q = values("model.layers.0.self_attn.q_proj.weight");
        let var = q.iter().map(|x| x * x).sum::<f32>() / q.len() as f32;
        assert!((var * 64.0 - 1.0).abs() < 0.1, "{arch}: var {var}");
    }
}

#[test]
fn bf16_is_the_rounded_f32_model() {
    let (f32_dir, bf16_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    synth(f32_dir.path(), Arch::Qwen2, DType::F32, 11);
    synth(bf16_dir.path(), Arch::Qwen2, DType::Bf16, 11);
    let a = std::fs::read(f32_dir.path().join("model.safetensors")).unwrap();
    let b = std::fs::read(bf16_dir.path().join("model.safetensors")).unwrap();
    let (a, b) = (
        SafeTensors::deserialize(&a).unwrap(),
        SafeTensors::deserialize(&b).unwrap(),
    );
    let name = "model.layers.1.self_attn.v_proj.bias";
    let full: Vec<half::bf16> = a
        .tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|x| half::bf16::from_f32(f32::from_le_bytes(x.try_into().unwrap())))
        .collect();
    let rounded: Vec<half::bf16> = b
        .tensor(name)
        .unwrap()
        .data()
        .chunks_exact(2)
        .map(|x| half::bf16::from_le_bytes([x[0], x[1]]))
        .collect();
    assert_eq!(full, rounded);
}

#[test]
fn output_is_deterministic() {
    for arch in ARCHS {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        synth(a.path(), arch, DType::F16, 5);
        synth(b.path(), arch, DType::F16, 5);
        let mut names: Vec<_> = std::fs::read_dir(a.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names.len(), 5, "{arch}: {names:?}");
        for name in &names {
            let x = std::fs::read(a.path().join(name)).unwrap();
            let y = std::fs::read(b.path().join(name)).unwrap();
            assert!(x == y, "{arch}: {name:?} differs between runs");
        }
        // A different seed changes the weights but not the tokenizer.
        let c = tempfile::tempdir().unwrap();
        synth(c.path(), arch, DType::F16, 6);
        let read = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();
        assert_ne!(
            read(a.path(), "model.safetensors"),
            read(c.path(), "model.safetensors")
        );
        assert_eq!(
            read(a.path(), "tokenizer.json"),
            read(c.path(), "tokenizer.json")
        );
    }
}

#[test]
fn rerun_replaces_stale_weights() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model-00001-of-00002.safetensors"), b"old").unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"keep me").unwrap();
    synth(dir.path(), Arch::Llama, DType::F32, 1);
    assert!(!dir.path().join("model-00001-of-00002.safetensors").exists());
    assert!(dir.path().join("notes.txt").exists());
    assert!(dir.path().join("model.safetensors").exists());
}

/// Hides the tokenizer's byte table, so the detokenizer takes its generic window path.
struct WindowOnly<'a>(&'a Tokenizer);

impl tokens::Decode for WindowOnly<'_> {
    fn decode_ids(&self, ids: &[u32], skip: bool) -> Result<String, tokens::TokenizerError> {
        self.0.decode(ids, skip)
    }
}

fn stream<D: tokens::Decode>(mut d: tokens::IncrementalDetokenizer<D>, ids: &[u32]) -> Vec<String> {
    let mut parts: Vec<String> = ids.iter().map(|&id| d.push(id).unwrap()).collect();
    parts.push(d.finish().unwrap());
    parts
}

#[test]
fn streamed_text_is_the_decoded_text() {
    use tokens::IncrementalDetokenizer;
    let text = "Le café coûte 3 €. 日本語のテキスト 🚀 ok\n";
    for arch in ARCHS {
        let dir = tempfile::tempdir().unwrap();
        synth(dir.path(), arch, DType::F32, 7);
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        let table = tok.token_bytes().expect("synth tokenizers are byte-level");
        let vocab = tok.vocab_size() as u32;
        assert!(table.get(vocab, false).is_empty(), "{arch}: unknown id");

        // Real text: both detokenizer paths give the text back, never a split character.
        let ids = tok.encode(text, false).unwrap();
        let fast = stream(IncrementalDetokenizer::new(&tok, true), &ids);
        let window = stream(IncrementalDetokenizer::new(WindowOnly(&tok), true), &ids);
        assert_eq!(fast.concat(), text, "{arch}");
        assert_eq!(window.concat(), text, "{arch}");
        assert!(
            fast.iter().all(|p| !p.contains('\u{FFFD}')),
            "{arch}: {fast:?}"
        );

        // Random ids, specials and incomplete characters included: the streamed text is
        // what decoding them all at once gives, with and without special tokens.
        let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ arch as u64;
        for len in [1usize, 2, 3, 7, 40, 200] {
            for _ in 0..20 {
                let ids: Vec<u32> = (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        (state >> 32) as u32 % (vocab + 2)
                    })
                    .collect();
                for skip in [true, false] {
                    let streamed = stream(IncrementalDetokenizer::new(&tok, skip), &ids);
                    assert_eq!(
                        streamed.concat(),
                        tok.decode(&ids, skip).unwrap(),
                        "{arch}: ids {ids:?} skip {skip}"
                    );
                }
            }
        }
    }
}
