//! `switchyard bench profile` writes a profile the mock engine loads, and `serve --engine
//! mock --mock-profile` runs on it.

mod common;

use std::process::Command;

use common::{summarize, EventStream, Server, BIN};
use serde_json::json;

#[test]
fn a_measured_profile_loads_into_the_mock_engine() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    common::synth_tiny(&model);
    let out = dir.path().join("profile.json");
    let run = Command::new(BIN)
        .args(["bench", "profile", "--threads", "1", "--repeats", "2"])
        .args([
            "--prefill-tokens",
            "32,128",
            "--batch",
            "1,4",
            "--context",
            "32,64",
        ])
        .args(["--kv-tokens", "4096", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let profile = mocker::Profile::load(&out).expect("a valid profile");
    let points = profile.points();
    assert_eq!(points.prefill.len(), 2);
    assert_eq!(points.decode.len(), 4);
    assert!(points.prefill.iter().all(|p| p.seconds > 0.0));
    let kv: Vec<u64> = points.decode.iter().map(|d| d.kv_tokens).collect();
    assert_eq!(kv, [32, 64, 128, 256]);

    // The mock serves with it.
    let profile_arg = out.to_str().unwrap().to_string();
    let srv = Server::start(&["--engine", "mock", "--mock-profile", &profile_arg]);
    let body = json!({"prompt": "hello", "max_tokens": 7, "stream": true,
        "stream_options": {"include_usage": true}});
    let s = summarize(&EventStream::open(&srv.addr, "/v1/completions", &body).collect());
    assert_eq!(s.usage.unwrap()["completion_tokens"], 7);

    // A grid with nothing that fits is refused with a clear message.
    let run = Command::new(BIN)
        .args([
            "bench",
            "profile",
            "--threads",
            "1",
            "--prefill-tokens",
            "999999",
        ])
        .args([
            "--batch",
            "1",
            "--context",
            "32",
            "--kv-tokens",
            "4096",
            "--model",
        ])
        .arg(&model)
        .arg("--out")
        .arg(dir.path().join("none.json"))
        .output()
        .unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("error:") && err.contains("prefill"), "{err}");
}
