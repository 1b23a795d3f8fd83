//! `--tp` and `--cuda-devices` on `generate` and `bench engine`: the CPU emulation gives the
//! same greedy tokens as one rank, and bad GPU lists are refused before any GPU is touched.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::BIN;

fn run(args: &[&str], model: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--model")
        .arg(model)
        .output()
        .expect("running switchyard")
}

fn output_ids(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("generate --json prints one JSON object");
    v["output_ids"].clone()
}

#[test]
fn generate_on_two_and_four_ranks_matches_one() {
    let dir = tempfile::tempdir().unwrap();
    common::synth_tiny(dir.path());
    let args = |tp: &'static str| {
        [
            "generate",
            "--prompt",
            "the quick brown fox",
            "--max-tokens",
            "16",
            "--ignore-eos",
            "--json",
            "--threads",
            "1",
            "--tp",
            tp,
        ]
    };
    let want = output_ids(&run(&args("1"), dir.path()));
    assert_eq!(want.as_array().map(Vec::len), Some(16), "{want}");
    for tp in ["2", "4"] {
        assert_eq!(output_ids(&run(&args(tp), dir.path())), want, "--tp {tp}");
    }
}

#[test]
fn bench_engine_reports_its_ranks() {
    let dir = tempfile::tempdir().unwrap();
    common::synth_tiny(dir.path());
    let json = dir.path().join("report.json");
    let out = Command::new(BIN)
        .args([
            "bench",
            "engine",
            "--tp",
            "2",
            "--threads",
            "1",
            "--batch",
            "1,2",
        ])
        .args([
            "--decode-tokens",
            "4",
            "--prefill-prompts",
            "1",
            "--prefill-len",
            "16",
        ])
        .args(["--memory-bandwidth-gbs", "10", "--model"])
        .arg(dir.path())
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(r["tensor_parallel"], 2, "{r}");
    assert_eq!(r["decode"].as_array().map(Vec::len), Some(2), "{r}");
    assert!(r["prefill_tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
}

#[test]
fn bad_gpu_lists_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    common::synth_tiny(dir.path());
    let cases: [(&[&str], &str); 4] = [
        (
            &["--device", "cuda", "--cuda-devices", "0,1,0"],
            "lists GPU 0 twice",
        ),
        (
            &["--device", "cuda", "--cuda-devices", "0,1", "--tp", "4"],
            "--tp 4 does not match --cuda-devices",
        ),
        (
            &["--cuda-devices", "1"],
            "--cuda-devices needs --device cuda",
        ),
        (
            &["--cuda-devices", "1", "--cuda-device", "2"],
            "--cuda-device",
        ),
    ];
    for (flags, message) in cases {
        for cmd in [
            &["generate", "--prompt", "hi"][..],
            &["bench", "engine"][..],
        ] {
            let args: Vec<&str> = cmd.iter().chain(flags).copied().collect();
            let out = run(&args, dir.path());
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} succeeded");
            assert!(err.contains(message), "{args:?}: {err}");
        }
    }
}
