//! End-to-end tests of `switchyard serve`: the real binary on an ephemeral 127.0.0.1 port
//! with a tiny synthetic model, driven over raw HTTP/1.1.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::{summarize, EventStream, Server};
use serde_json::{json, Value};

#[test]
fn chat_and_completions_round_trip() {
    let srv = Server::start(&[]);
    let health = srv.get("/health");
    assert_eq!(health.status, 200, "{}", health.text());

    let models = srv.get("/v1/models").json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(srv.get("/v1/models/tiny").status, 200);

    let r = srv.post(
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello!"}],
                "max_tokens": 5, "ignore_eos": true, "user": "someone"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 3);
    assert_eq!(v["usage"]["total_tokens"], prompt_tokens + 5);
    assert!(v["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());

    // Token-id prompt; max_completion_tokens is the chat name, max_tokens the legacy one.
    let r = srv.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": [1, 2, 3, 4], "max_tokens": 7, "ignore_eos": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert_eq!(v["usage"]["completion_tokens"], 7);
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    // Streaming and non-streaming agree (seeded sampling), and streamed text is valid UTF-8
    // piece by piece (every chunk parsed as JSON strings).
    for (path, body) in [
        (
            "/v1/completions",
            json!({"prompt": "The switchyard", "max_tokens": 40,
            "temperature": 0.9, "seed": 11, "ignore_eos": true}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "日本語 ok?"}],
            "max_completion_tokens": 40, "temperature": 0.9, "seed": 11, "ignore_eos": true}),
        ),
    ] {
        let whole = srv.post(path, &body).json();
        let text = whole["choices"][0]["text"]
            .as_str()
            .or(whole["choices"][0]["message"]["content"].as_str())
            .unwrap()
            .to_string();
        let mut sbody = body.clone();
        sbody["stream"] = json!(true);
        sbody["stream_options"] = json!({"include_usage": true});
        let stream = EventStream::open(&srv.addr, path, &sbody);
        assert_eq!(stream.status, 200);
        let events = stream.collect();
        let s = summarize(&events);
        assert!(s.done, "no [DONE]: {events:?}");
        assert_eq!(s.text, text, "{path}");
        assert_eq!(s.finish_reason.as_deref(), Some("length"));
        let usage = s.usage.expect("usage chunk");
        assert_eq!(usage["completion_tokens"], 40);
        assert_eq!(usage, whole["usage"].clone().with_cached(&usage));
        if path.contains("chat") {
            let first: Value = serde_json::from_str(&events[0]).unwrap();
            assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
            assert_eq!(first["object"], "chat.completion.chunk");
        }
    }
}

/// Usage equality up to the cached-token count, which depends on what ran before.
trait WithCached {
    fn with_cached(self, other: &Value) -> Value;
}

impl WithCached for Value {
    fn with_cached(mut self, other: &Value) -> Value {
        self["prompt_tokens_details"] = other["prompt_tokens_details"].clone();
        self
    }
}

#[test]
fn parameters_stop_logprobs_and_n() {
    let srv = Server::start(&[]);
    // Greedy output, then a stop string from its middle: the text ends right before it.
    let greedy = srv
        .post(
            "/v1/completions",
            &json!({"prompt": "Once upon", "max_tokens": 40, "temperature": 0, "ignore_eos": true}),
        )
        .json();
    let text = greedy["choices"][0]["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let expected = &text[..text.find(&stop).unwrap()];
    for stream in [false, true] {
        let body = json!({"prompt": "Once upon", "max_tokens": 40, "temperature": 0,
                          "ignore_eos": true, "stop": [stop, "\u{0}never"], "stream": stream,
                          "stream_options": {"include_usage": true}});
        let (out, finish, usage) = if stream {
            let s = summarize(&EventStream::open(&srv.addr, "/v1/completions", &body).collect());
            (s.text, s.finish_reason.unwrap(), s.usage.unwrap())
        } else {
            let v = srv.post("/v1/completions", &body).json();
            (
                v["choices"][0]["text"].as_str().unwrap().to_string(),
                v["choices"][0]["finish_reason"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                v["usage"].clone(),
            )
        };
        assert_eq!(out, expected, "stop {stop:?} stream={stream}");
        assert_eq!(finish, "stop");
        // The sequence was cut at the stop, not run to max_tokens.
        assert!(usage["completion_tokens"].as_u64().unwrap() < 40, "{usage}");
    }
    srv.wait_idle(Duration::from_secs(10));

    // Chat logprobs with alternatives.
    let v = srv
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                    "ignore_eos": true, "logprobs": true, "top_logprobs": 3}),
        )
        .json();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 4);
    for c in content {
        assert!(c["logprob"].as_f64().unwrap() <= 0.0);
        assert_eq!(c["top_logprobs"].as_array().unwrap().len(), 3);
    }
    // Completion logprobs: parallel arrays.
    let v = srv
        .post(
            "/v1/completions",
            &json!({"prompt": "hi", "max_tokens": 3, "ignore_eos": true, "logprobs": 2}),
        )
        .json();
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 3);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 3);
    assert_eq!(lp["text_offset"].as_array().unwrap().len(), 3);

    // n > 1: one choice per sequence, each with its own index; seeded, so reproducible.
    let body = json!({"prompt": "abc", "max_tokens": 6, "n": 3, "seed": 5,
                      "temperature": 1.0, "ignore_eos": true});
    let a = srv.post("/v1/completions", &body).json();
    let b = srv.post("/v1/completions", &body).json();
    assert_eq!(a["choices"].as_array().unwrap().len(), 3);
    assert_eq!(a["usage"]["completion_tokens"], 18);
    for i in 0..3 {
        assert_eq!(a["choices"][i]["index"], i);
        assert_eq!(a["choices"][i]["text"], b["choices"][i]["text"]);
    }
    // Batch prompts and penalties go through.
    let v = srv
        .post(
            "/v1/completions",
            &json!({"prompt": ["a", "b"], "max_tokens": 2, "ignore_eos": true,
                    "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2,
                    "top_k": 20, "top_p": 0.9, "min_p": 0.05}),
        )
        .json();
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["usage"]["completion_tokens"], 4);
}

fn error_of(r: &common::Response, status: u16) -> Value {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    e.clone()
}

#[test]
fn errors_have_openai_shape_and_status() {
    let srv = Server::start(&["--max-pending", "1", "--max-body-bytes", "16384"]);
    let chat = "/v1/chat/completions";
    let cmpl = "/v1/completions";
    let msgs = json!([{"role": "user", "content": "hi"}]);

    for (path, body, param) in [
        (
            chat,
            json!({"messages": msgs, "temperature": -1}),
            "temperature",
        ),
        (chat, json!({"messages": msgs, "top_p": 2}), "top_p"),
        (
            chat,
            json!({"messages": msgs, "max_tokens": "ten"}),
            "max_tokens",
        ),
        (
            chat,
            json!({"messages": msgs, "max_completion_tokens": 0}),
            "max_completion_tokens",
        ),
        (chat, json!({"messages": msgs, "n": 0}), "n"),
        (
            chat,
            json!({"messages": msgs, "top_logprobs": 2}),
            "top_logprobs",
        ),
        (
            chat,
            json!({"messages": msgs, "logprobs": true, "top_logprobs": 50}),
            "top_logprobs",
        ),
        (chat, json!({"messages": []}), "messages"),
        (chat, json!({"model": "tiny"}), "messages"),
        (
            chat,
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            "messages[0].content[0]",
        ),
        (cmpl, json!({"prompt": "x", "logprobs": 99}), "logprobs"),
        (cmpl, json!({"prompt": "x", "stop": 5}), "stop"),
        (cmpl, json!({"prompt": [100000]}), "prompt"),
        (cmpl, json!({"prompt": []}), "prompt"),
        // Longer than the tiny model's 2048-token context window.
        (cmpl, json!({"prompt": vec![5; 3000]}), "prompt"),
    ] {
        let e = error_of(&srv.post(path, &body), 400);
        assert_eq!(e["param"], param, "{body}: {e}");
        assert_eq!(e["type"], "invalid_request_error");
    }

    // Malformed bodies: 400 in the same shape, never axum's 422 text.
    for raw in ["{not json", "[]", "", "{\"prompt\": \"x\"} extra"] {
        let r = common::request(&srv.addr, "POST", cmpl, Some(raw.as_bytes()));
        error_of(&r, 400);
    }

    let e = error_of(
        &srv.post(chat, &json!({"model": "gpt-4", "messages": msgs})),
        404,
    );
    assert_eq!(e["code"], "model_not_found");
    error_of(&srv.get("/v1/models/gpt-4"), 404);
    error_of(&srv.get("/v2/nothing"), 404);
    error_of(&common::request(&srv.addr, "GET", cmpl, None), 405);

    let big = json!({"prompt": "x".repeat(20000)});
    let e = error_of(&srv.post(cmpl, &big), 413);
    assert_eq!(e["code"], "request_too_large");

    // Admission holds one sequence: while a long stream runs, the next request is refused.
    let mut busy = EventStream::open(
        &srv.addr,
        cmpl,
        &json!({"prompt": "x", "max_tokens": 2000, "ignore_eos": true, "stream": true}),
    );
    assert!(busy.next_data().is_some());
    let e = error_of(&srv.post(chat, &json!({"messages": msgs})), 429);
    assert_eq!(e["code"], "queue_full");
    assert_eq!(e["type"], "rate_limit_error");
    drop(busy);
    srv.wait_idle(Duration::from_secs(10));
    // Two sequences with room for one: refused, and the one admitted is aborted. (Long, so
    // it cannot finish before the second is submitted.)
    let e = error_of(
        &srv.post(
            cmpl,
            &json!({"prompt": "x", "n": 2, "max_tokens": 2000, "ignore_eos": true}),
        ),
        429,
    );
    assert_eq!(e["code"], "queue_full");
    srv.wait_idle(Duration::from_secs(10));
    // The server is fine afterwards.
    assert_eq!(
        srv.post(cmpl, &json!({"prompt": "x", "max_tokens": 2}))
            .status,
        200
    );

    let metrics = srv.get("/metrics").text();
    assert!(
        metrics.contains(
            "switchyard_requests_total{endpoint=\"/v1/chat/completions\",status=\"400\"}"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("status=\"429\""), "{metrics}");
}

#[test]
fn concurrent_streams_finish_with_exact_counts() {
    let srv = Server::start(&[]);
    let handles: Vec<_> = (0..64)
        .map(|i| {
            let addr = srv.addr.clone();
            std::thread::spawn(move || {
                let max_tokens = 8 + i % 24;
                let (path, body) = if i % 2 == 0 {
                    (
                        "/v1/completions",
                        json!({"prompt": format!("request {i}"),
                        "max_tokens": max_tokens, "ignore_eos": true, "stream": true,
                        "stream_options": {"include_usage": true}}),
                    )
                } else {
                    (
                        "/v1/chat/completions",
                        json!({"messages": [{"role": "user",
                        "content": format!("request {i}")}], "max_tokens": max_tokens,
                        "ignore_eos": true, "stream": true,
                        "stream_options": {"include_usage": true}}),
                    )
                };
                let s = summarize(&EventStream::open(&addr, path, &body).collect());
                (max_tokens, s)
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        let (max_tokens, s) = h.join().expect("client thread");
        assert!(s.done);
        assert_eq!(s.finish_reason.as_deref(), Some("length"));
        assert_eq!(s.usage.unwrap()["completion_tokens"], max_tokens);
        total += max_tokens;
    }
    srv.wait_idle(Duration::from_secs(10));
    assert_eq!(
        srv.metric("switchyard_generation_tokens_total") as usize,
        total
    );
    assert_eq!(srv.metric("switchyard_requests_cancelled_total"), 0.0);
    assert_eq!(srv.metric("switchyard_num_requests_running"), 0.0);
    assert_eq!(srv.metric("switchyard_kv_cache_usage_ratio"), 0.0);
}

#[test]
fn disconnecting_clients_free_their_sequences() {
    let srv = Server::start(&[]);
    let long = |stream: bool| {
        json!({"prompt": "a long story", "max_tokens": 2000, "ignore_eos": true,
               "stream": stream})
    };
    // Streaming clients that have their first token, and non-streaming clients waiting for
    // their answer; all hang up while their sequences run.
    let streams: Vec<_> = (0..4)
        .map(|_| {
            let mut s = EventStream::open(&srv.addr, "/v1/completions", &long(true));
            assert!(s.next_data().is_some());
            s
        })
        .collect();
    let sockets: Vec<_> = (0..2)
        .map(|_| {
            let mut sock = TcpStream::connect(&srv.addr).unwrap();
            let body = long(false).to_string();
            write!(
                sock,
                "POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            sock
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while srv.stats()["pending"] != 6 {
        assert!(
            std::time::Instant::now() < deadline,
            "not all admitted: {}",
            srv.stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(streams);
    drop(sockets);
    let stats = srv.wait_idle(Duration::from_secs(20));
    assert_eq!(stats["blocks_used"], 0);
    assert_eq!(srv.metric("switchyard_requests_cancelled_total"), 6.0);
    // Generation stopped early: far fewer tokens than the six requests asked for.
    assert!(srv.metric("switchyard_generation_tokens_total") < 6.0 * 2000.0);
}

#[test]
fn sigterm_finishes_in_flight_work_and_exits_zero() {
    let mut srv = Server::start(&["--shutdown-timeout", "20"]);
    let mut s = EventStream::open(
        &srv.addr,
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 1500, "ignore_eos": true, "stream": true,
                "stream_options": {"include_usage": true}}),
    );
    let first = s.next_data().expect("a first event");
    let addr = srv.addr.clone();
    let reader = std::thread::spawn(move || {
        let mut events = vec![first];
        events.extend(s.collect());
        events
    });
    let status = srv.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        srv.log()
    );
    let streamed = summarize(&reader.join().unwrap());
    assert!(streamed.done);
    assert_eq!(streamed.usage.unwrap()["completion_tokens"], 1500);
    assert!(
        TcpStream::connect(&addr).is_err(),
        "still accepting after exit"
    );
}

/// `Cpus_allowed_list` of /proc/<pid>/task/<tid>/status (or /proc/self/status), as CPUs.
#[cfg(target_os = "linux")]
fn allowed_cpus(status: &str) -> Vec<usize> {
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("a Cpus_allowed_list line")
        .trim();
    list.split(',')
        .flat_map(|part| match part.split_once('-') {
            Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).collect::<Vec<usize>>(),
            None => vec![part.parse().unwrap()],
        })
        .collect()
}

/// (thread name, allowed CPUs) for every thread of `pid`.
#[cfg(target_os = "linux")]
fn thread_cpus(pid: u32) -> Vec<(String, Vec<usize>)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the server's task list")
        .map(|t| {
            let t = t.unwrap().path();
            let name = std::fs::read_to_string(t.join("comm")).unwrap();
            let status = std::fs::read_to_string(t.join("status")).unwrap();
            (name.trim().to_string(), allowed_cpus(&status))
        })
        .collect()
}

#[cfg(target_os = "linux")]
#[test]
fn cpu_affinity_gives_the_engine_its_own_cores() {
    let mine = allowed_cpus(&std::fs::read_to_string("/proc/self/status").unwrap());
    // The test servers run one compute thread and, given here, one HTTP worker.
    let srv = Server::start(&["--http-threads", "1"]);
    // The ready line can come before the new engine thread has named and placed itself
    // (a fresh thread shows its parent's name until it runs); one answered request means
    // it has.
    let r = srv.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "hi", "max_tokens": 1}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let threads = thread_cpus(srv.pid());
    let engine: Vec<_> = threads
        .iter()
        .filter(|(n, _)| n == "switchyard-engi")
        .collect();
    assert_eq!(engine.len(), 1, "one engine thread: {threads:?}");
    if mine.len() >= 2 {
        let last = *mine.last().unwrap();
        assert_eq!(engine[0].1, vec![last], "{threads:?}");
        for (name, cpus) in threads.iter().filter(|(n, _)| n != "switchyard-engi") {
            assert!(
                !cpus.contains(&last),
                "{name} may run on the engine's CPU: {cpus:?}"
            );
            assert_eq!(cpus.len(), mine.len() - 1, "{name}: {cpus:?}");
        }
        assert!(srv.log().contains("CPU placement: compute threads on CPU"));
    } else {
        // One CPU: nothing to split, every thread keeps the process's set.
        assert!(threads.iter().all(|(_, cpus)| *cpus == mine), "{threads:?}");
    }
    drop(srv);

    let srv = Server::start(&["--http-threads", "1", "--cpu-affinity", "none"]);
    let threads = thread_cpus(srv.pid());
    assert!(threads.iter().all(|(_, cpus)| *cpus == mine), "{threads:?}");
    assert!(!srv.log().contains("CPU placement"));
}
