//! End-to-end tests of `switchyard bench serve --spawn`: the benchmark starts the real server
//! on a tiny model, loads it with synthetic, multi-turn or trace-replay workloads, stops it,
//! and its JSON report has exact counts.

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
    // The engine's step-time histogram covers the same steps.
    let st = &r["engine_step_ms"];
    assert_eq!(st["steps"], cpu["engine_steps"], "{r}");
    let q = |k: &str| st[k].as_f64().unwrap();
    assert!(
        q("p50") > 0.0 && q("p50") <= q("p99") && q("p99") <= q("max"),
        "{r}"
    );
    assert!(q("max") < r["e2e_ms"]["max"].as_f64().unwrap(), "{r}");
    // Every output token's wait between the engine and the HTTP response was measured.
    let d = &r["token_delivery_ms"];
    assert_eq!(d["tokens"], 8 * 16, "{r}");
    assert!(
        d["p50"].as_f64().unwrap() <= d["p999"].as_f64().unwrap(),
        "{r}"
    );
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

/// A small Mooncake-format trace: every request starts with block 0 (a shared system
/// prompt), a quarter share each second block, the rest is their own. Returns the path and
/// each line's (input_length, output_length).
fn write_trace(dir: &std::path::Path) -> (std::path::PathBuf, Vec<(u64, u64)>) {
    let mut text = String::new();
    let mut lines = Vec::new();
    for i in 0..20u64 {
        let blocks = 2 + i % 3;
        let input = 512 * blocks - 100;
        let output = 20 + i;
        let mut ids = vec![0, 1 + i % 4];
        ids.extend((2..blocks).map(|j| 100 + 10 * i + j));
        let line = serde_json::json!({
            "timestamp": 50 * i,
            "input_length": input,
            "output_length": output,
            "hash_ids": ids,
        });
        text.push_str(&format!("{line}\n"));
        lines.push((input, output));
    }
    let path = dir.join("trace.jsonl");
    std::fs::write(&path, text).unwrap();
    (path, lines)
}

#[test]
fn mooncake_replay_scales_the_trace_and_reports_goodput_and_lag() {
    let dir = tempfile::tempdir().unwrap();
    let (trace, lines) = write_trace(dir.path());
    let r = bench(
        dir.path(),
        &[
            "--workload",
            "mooncake",
            "--trace",
            trace.to_str().unwrap(),
            "--trace-block-tokens",
            "16",
            "--speedup",
            "4",
            "--max-requests",
            "15",
            "--max-output-tokens",
            "6",
            "--slo-ttft-ms",
            "60000",
            "--slo-itl-ms",
            "60000",
        ],
    );
    assert_eq!(r["requests"], 15, "{r}");
    assert_eq!(r["completed"], 15, "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(r["load"], "trace", "{r}");
    assert_eq!(r["workload"]["kind"], "mooncake", "{r}");
    assert_eq!(r["workload"]["block_tokens"], 16, "{r}");
    // Prompts are the trace's lengths scaled by 16 / 512, rounded up.
    let prompt: u64 = lines[..15]
        .iter()
        .map(|&(i, _)| (i * 16).div_ceil(512))
        .sum();
    assert_eq!(r["total_prompt_tokens"], prompt, "{r}");
    assert_eq!(r["total_output_tokens"], 15 * 6, "{r}");
    let cached = r["total_cached_tokens"].as_u64().unwrap();
    let rate = r["prefix_hit_rate"].as_f64().unwrap();
    assert!((rate - cached as f64 / prompt as f64).abs() < 1e-9, "{r}");
    // Generous SLOs: everything that completed is good.
    let g = &r["goodput"];
    assert_eq!(g["met"], 15, "{r}");
    assert_eq!(g["fraction"], 1.0, "{r}");
    assert_eq!(g["slo_ttft_ms"], 60000.0, "{r}");
    assert_eq!(g["slo_itl_ms"], 60000.0, "{r}");
    assert!(g["output_tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
    let lag = &r["arrival_lag_ms"];
    assert!(lag["p99"].as_f64().unwrap() >= 0.0, "{r}");
    assert!(lag["max"].as_f64().unwrap() >= lag["p50"].as_f64().unwrap());
}

#[test]
fn multi_turn_conversations_reuse_the_prefix_cache() {
    let dir = tempfile::tempdir().unwrap();
    let r = bench(
        dir.path(),
        &[
            "--workload",
            "multi-turn",
            "--conversations",
            "3",
            "--turns",
            "3",
            "--user-tokens",
            "16",
            "--answer-tokens",
            "16",
            "--max-tokens",
            "4",
            "--concurrency",
            "2",
            "--slo-ttft-ms",
            "60000",
        ],
    );
    assert_eq!(r["requests"], 9, "{r}");
    assert_eq!(r["completed"], 9, "{r}");
    assert_eq!(r["workload"]["kind"], "multi_turn", "{r}");
    // Turns of 16, 16 + 16 + 16 and 48 + 16 + 16 tokens, in each of 3 conversations.
    assert_eq!(r["total_prompt_tokens"], 3 * (16 + 48 + 80), "{r}");
    assert_eq!(r["total_output_tokens"], 9 * 4, "{r}");
    // Each turn starts after the previous one finished, whose prompt is then cached; the
    // stand-in answer is not what the model generated, so at most the previous prompt hits.
    let cached = r["total_cached_tokens"].as_u64().unwrap();
    assert!(cached > 0 && cached <= 3 * (16 + 48), "{r}");
    assert!(r["prefix_hit_rate"].as_f64().unwrap() > 0.0, "{r}");
    assert_eq!(r["goodput"]["met"], 9, "{r}");
    assert_eq!(r["goodput"]["slo_itl_ms"], serde_json::Value::Null, "{r}");
    // A closed loop has no schedule to lag behind.
    assert_eq!(r["arrival_lag_ms"], serde_json::Value::Null, "{r}");
}
