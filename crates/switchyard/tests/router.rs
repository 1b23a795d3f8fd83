//! Several engine instances behind the router, end to end through the real binary.

mod common;

use std::time::{Duration, Instant};

use common::{summarize, EventStream, Server};
use serde_json::{json, Value};

/// Prompts in groups that share a 64-token prefix (4 blocks of 16), each with its own
/// 8-token suffix, listed group after group.
fn grouped_prompts(groups: u32, per_group: u32) -> Vec<Vec<u32>> {
    let mut out = Vec::new();
    for g in 0..groups {
        for k in 0..per_group {
            let mut p: Vec<u32> = (0..64).map(|i| (g * 97 + i * 31 + 7) % 500 + 1).collect();
            p.extend((0..8).map(|i| (g * 13 + k * 41 + i * 3 + 200) % 500 + 1));
            out.push(p);
        }
    }
    out
}

fn complete(srv: &Server, prompt: &[u32]) -> String {
    let r = srv.post(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["choices"][0]["text"].as_str().unwrap().to_string()
}

fn hit_rate(stats: &Value) -> f64 {
    stats["prefix_hit_tokens"].as_f64().unwrap() / stats["prefix_query_tokens"].as_f64().unwrap()
}

#[test]
fn kv_routing_finds_cached_prefixes_that_round_robin_misses() {
    let prompts = grouped_prompts(6, 6);
    let reference = {
        let one = Server::start(&[]);
        prompts
            .iter()
            .map(|p| complete(&one, p))
            .collect::<Vec<_>>()
    };
    let mut rates = Vec::new();
    for mode in ["kv", "round-robin"] {
        let srv = Server::start(&["--instances", "4", "--router-mode", mode]);
        for (p, want) in prompts.iter().zip(&reference) {
            // Routing never changes what a request computes.
            assert_eq!(&complete(&srv, p), want, "mode {mode}");
        }
        let stats = srv.wait_idle(Duration::from_secs(10));
        assert_eq!(stats["router"]["instances"], 4, "{stats}");
        assert_eq!(stats["router"]["routed"], prompts.len(), "{stats}");
        let inst = srv.get("/admin/instances").json();
        let routed: Vec<u64> = inst["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["routed"].as_u64().unwrap())
            .collect();
        assert_eq!(routed.iter().sum::<u64>(), prompts.len() as u64);
        rates.push((
            mode,
            hit_rate(&stats),
            routed,
            stats["router"]["index_blocks"].clone(),
        ));
    }
    eprintln!("hit rates and routing: {rates:?}");
    let (kv, rr) = (&rates[0], &rates[1]);
    // Round-robin sends each group's 6 requests to 4 instances: 4 cold misses of 6.
    // KV routing keeps a group on the instance that holds it: 1 miss of 6.
    assert!(kv.1 > 0.6, "kv hit rate {rates:?}");
    assert!(kv.1 > rr.1 + 0.25, "kv should beat round-robin: {rates:?}");
    // The router saw the instances' KV events.
    assert!(kv.3.as_u64().unwrap() > 0, "{rates:?}");
}

#[test]
fn an_instance_that_stops_mid_load_is_forgotten_and_nothing_hangs() {
    let srv = Server::start(&["--instances", "3", "--router-mode", "round-robin"]);
    let clients: Vec<_> = (0..18)
        .map(|i| {
            let addr = srv.addr.clone();
            std::thread::spawn(move || {
                let body = json!({"prompt": format!("request number {i}"), "max_tokens": 400,
                    "ignore_eos": true, "stream": true});
                let start = Instant::now();
                let events = EventStream::open(&addr, "/v1/completions", &body).collect();
                (events, start.elapsed())
            })
        })
        .collect();
    // Stop instance 1 while it is running sequences (long enough ones that they are
    // still running when the stop arrives).
    let deadline = Instant::now() + Duration::from_secs(30);
    let running_on_1 = || {
        srv.get("/admin/instances").json()["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["info"]["id"] == 1)
            .and_then(|i| i["engine"]["running"].as_u64())
            .unwrap_or(0)
    };
    while running_on_1() == 0 {
        assert!(Instant::now() < deadline, "the load never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = srv.post("/admin/instances/1/stop", &json!({}));
    assert_eq!(r.status, 200, "{}", r.text());

    let (mut ok, mut failed) = (0, 0);
    for c in clients {
        let (events, took) = c.join().expect("client thread");
        assert!(
            took < Duration::from_secs(60),
            "a request hung for {took:?}"
        );
        let has_error = events.iter().any(|e| e.contains("\"error\""));
        if has_error {
            failed += 1;
        } else {
            let s = summarize(&events);
            assert!(s.done, "{events:?}");
            assert_eq!(s.finish_reason.as_deref(), Some("length"));
            ok += 1;
        }
    }
    assert_eq!(ok + failed, 18);
    // Instance 1 was running some of them when it stopped.
    assert!(failed >= 1, "ok {ok} failed {failed}");

    let inst = srv.get("/admin/instances").json();
    let ids: Vec<u64> = inst["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["info"]["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [0, 2]);
    let stats = srv.wait_idle(Duration::from_secs(10));
    assert_eq!(stats["router"]["instance_failures"], 1, "{stats}");
    assert_eq!(stats["router"]["failed_midstream"], failed, "{stats}");
    // New work goes to the two that are left, and all of it succeeds.
    for i in 0..6 {
        let r = srv.post(
            "/v1/completions",
            &json!({"prompt": format!("after {i}"), "max_tokens": 4}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // Stopping it again: it is gone.
    assert_eq!(srv.post("/admin/instances/1/stop", &json!({})).status, 404);
    assert_eq!(srv.post("/admin/instances/x/stop", &json!({})).status, 400);
}

#[test]
fn many_mock_instances_run_in_one_process() {
    let srv = Server::start(&[
        "--engine",
        "mock",
        "--instances",
        "32",
        "--router-mode",
        "round-robin",
        "--mock-speedup",
        "100",
    ]);
    let clients: Vec<_> = (0..64)
        .map(|i| {
            let addr = srv.addr.clone();
            std::thread::spawn(move || {
                let body = json!({"prompt": format!("mock request {i}"), "max_tokens": 5 + i % 7,
                    "stream": true, "stream_options": {"include_usage": true}});
                (
                    i,
                    summarize(&EventStream::open(&addr, "/v1/completions", &body).collect()),
                )
            })
        })
        .collect();
    for c in clients {
        let (i, s) = c.join().expect("client thread");
        assert!(s.done);
        assert_eq!(s.usage.unwrap()["completion_tokens"], 5 + i % 7);
    }
    let inst = srv.get("/admin/instances").json();
    let all = inst["instances"].as_array().unwrap();
    assert_eq!(all.len(), 32);
    for i in all {
        assert_eq!(i["routed"], 2, "{i}");
        assert_eq!(i["info"]["device"], "mock");
    }
    srv.wait_idle(Duration::from_secs(10));
}

#[test]
fn tensor_parallel_serve_gives_the_same_completions() {
    // --tp 2 on the CPU runs the sharded math (emulation): greedy outputs must not change.
    let prompts = grouped_prompts(2, 2);
    let one = Server::start(&[]);
    let want: Vec<String> = prompts.iter().map(|p| complete(&one, p)).collect();
    drop(one);
    let tp = Server::start(&["--tp", "2"]);
    for (p, w) in prompts.iter().zip(&want) {
        assert_eq!(&complete(&tp, p), w);
    }
    let inst = tp.get("/admin/instances").json();
    assert_eq!(inst["instances"][0]["info"]["tensor_parallel"], 2, "{inst}");
    assert_eq!(
        inst["instances"][0]["info"]["device"], "cpu (tp 2)",
        "{inst}"
    );
    // Nonsense combinations are refused by name.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--tp", "2", "--engine", "mock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--tp"),
        "{out:?}"
    );
}
