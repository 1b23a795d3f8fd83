//! Loading errors name the file and the tensor at fault; every dtype loads.

mod common;

use common::*;
use engine::backend::cpu::CpuBackend;
use engine::model::{Model, ModelError};

fn load(dir: &std::path::Path) -> Result<Model<CpuBackend>, ModelError> {
    Model::load(dir, &CpuBackend::new(), &mut |_, _| {})
}

fn edit_config(dir: &std::path::Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
}

#[test]
fn shape_mismatch_names_file_and_tensor() {
    let dir = synth_tiny(synth::Arch::Llama, synth::DType::F32, 1);
    edit_config(dir.path(), |v| v["intermediate_size"] = 96.into());
    let err = load(dir.path()).err().expect("must fail").to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(err.contains("mlp.gate_proj.weight"), "{err}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = synth_tiny(synth::Arch::Mistral, synth::DType::F32, 1);
    // Untied mistral needs lm_head; claim qwen2 so q/k/v biases are expected and missing.
    edit_config(dir.path(), |v| v["model_type"] = "qwen2".into());
    let err = load(dir.path()).err().expect("must fail").to_string();
    assert!(
        err.contains("q_proj.bias") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = synth_tiny(synth::Arch::Llama, synth::DType::F32, 1);
    edit_config(dir.path(), |v| v["model_type"] = "gpt_neox".into());
    let err = load(dir.path()).err().expect("must fail").to_string();
    assert!(
        err.contains("gpt_neox") && err.contains("config.json"),
        "{err}"
    );
}

#[test]
fn half_precision_checkpoints_agree_with_f32() {
    // The same seed rounded to bf16/f16 gives close logits and, mostly, the same tokens.
    let f32_dir = synth_tiny(synth::Arch::Qwen3, synth::DType::F32, 3);
    let p = prompt(1, 30, 512);
    let mut e = engine(f32_dir.path(), opts(32, 16));
    let want = run_all(&mut e, vec![greedy(p.clone(), 8)], 1);
    for dtype in [synth::DType::Bf16, synth::DType::F16] {
        let dir = synth_tiny(synth::Arch::Qwen3, dtype, 3);
        let mut e = engine(dir.path(), opts(32, 16));
        let got = run_all(&mut e, vec![greedy(p.clone(), 8)], 1);
        assert_eq!(got[0].tokens[0], want[0].tokens[0], "{dtype:?} first token");
    }
}
