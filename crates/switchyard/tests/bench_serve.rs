//! End-to-end tests of `switchyard bench serve --spawn`: the benchmark starts the real server
//! on a tiny model, loads it, stops it, and its JSON report has exact counts.

mod common;

use std::process::Command;

use serde_json::Value;

fn bench(dir: &std::path::Path, extra: &[&str]) -> Value {
    let model = dir.join("tiny");
    common::synth_tiny(&model);
    let json = dir.join("report.json");
    let serve_args = format!("--model {} --threads 1 --kv-cache-mb 16", model.display());
    let out = Command::new(common::BIN)
        .args(["bench", "serve", "--spawn", "--serve-args", &serve_args])
        .args(["--timeout", "60", "--json"])
        .arg(&json)
        .args(extra)
        .output()
        .expect("running switchyard bench serve");
    assert!(
        out.status.success(),
        "bench failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("| inter-token |"), "{table}");
    serde_json::from_slice(&std::fs::read(&json).expect("the JSON report")).expect("JSON")
}

#[test]
fn closed_loop_completions_report_exact_counts() {
    let dir = tempfile::tempdir().unwrap();
    let r = bench(
        dir.path(),
        &[
            "--requests",
            "8",
            "--concurrency",
            "4",
            "--prompt-tokens",
            "12",
            "--max-tokens",
            "16",
            "--prefix-groups",
            "2",
            "--prefix-tokens",
            "8",
        ],
    );
    assert_eq!(r["completed"], 8, "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(r["errors"], serde_json::json!({}), "{r}");
    assert_eq!(r["total_prompt_tokens"], 8 * 12, "{r}");
    assert_eq!(r["total_output_tokens"], 8 * 16, "{r}");
    assert_eq!(r["output_tokens_min"], 16, "{r}");
    assert_eq!(r["output_tokens_max"], 16, "{r}");
    assert_eq!(r["model"], "tiny");
    assert!(r["ttft_ms"]["p50"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["e2e_ms"]["p99"].as_f64().unwrap() >= r["ttft_ms"]["p99"].as_f64().unwrap());
    let cpu = &r["server_cpu"];
    assert!(cpu["engine_steps"].as_u64().unwrap() >= 16, "{r}");
    let roles: Vec<&str> = cpu["threads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["role"].as_str().unwrap())
        .collect();
    assert!(
        roles.contains(&"engine") && roles.contains(&"http"),
        "{roles:?}"
    );
}

#[test]
fn open_loop_chat_completes_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let r = bench(
        dir.path(),
        &[
            "--endpoint",
            "chat",
            "--requests",
            "6",
            "--rate",
            "50",
            "--prompt-tokens",
            "10",
            "--max-tokens",
            "5",
        ],
    );
    assert_eq!(r["completed"], 6, "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(r["total_output_tokens"], 6 * 5, "{r}");
    assert!(r["load"]["rate"].as_f64().unwrap() == 50.0, "{r}");
}
